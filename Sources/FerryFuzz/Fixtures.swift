import FerryWire

/// The fixed secrets and transcripts the harness checks proofs against. Fixed, not random,
/// so that a crash reproduces from its input alone and the seed corpus (written from the
/// same values) holds genuine proofs the fuzzer can mutate.
enum Fixtures {
    /// The cluster key every host in the harness holds.
    static let key = ClusterKey(bytes: (0..<ClusterKey.byteCount).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) })
    /// A key nobody in the harness holds: a proof under it must never verify.
    static let strangerKey = ClusterKey(bytes: (0..<ClusterKey.byteCount).map { UInt8(truncatingIfNeeded: 200 &- $0 &* 5) })
    static let ring = KeyRing(keys: [key])

    static let sourceNonce = String(repeating: "5a", count: Handshake.nonceByteCount)
    static let destinationNonce = String(repeating: "d3", count: Handshake.nonceByteCount)
    static let software = "ferry-fuzz"

    /// The keys of the session the genuine transcript below opens.
    static let sessionKeys = SessionKeys(key: key, sourceNonce: sourceNonce, destinationNonce: destinationNonce)
    static let session = String(repeating: "0f", count: 16)

    /// A genuine handshake: hello, welcome with the destination's proof, auth with the source's.
    static let helloPayload = ControlCoding.encode(HelloMessage(
        software: software, host: "source", auth: AuthOffer(keyID: key.id, nonce: sourceNonce)))
    static let welcomePayload = ControlCoding.encode(WelcomeMessage(
        version: ProtocolVersion.current, software: software, host: "destination",
        auth: AuthReply(nonce: destinationNonce,
                        proof: Handshake.destinationProof(key: key, helloPayload: helloPayload,
                                                          destinationNonce: destinationNonce,
                                                          version: ProtocolVersion.current))))
    static let authPayload = ControlCoding.encode(AuthMessage(
        proof: Handshake.sourceProof(key: key, helloPayload: helloPayload, welcomePayload: welcomePayload)))
}
