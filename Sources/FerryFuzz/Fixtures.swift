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
    /// Key shares as they travel (hex); the proofs cover them as text.
    static let sourceShare = String(repeating: "a1", count: 32)
    static let destinationShare = String(repeating: "b2", count: 32)
    /// Stands for the X25519 secret of the two shares.
    static let sharedSecret = [UInt8](repeating: 0x77, count: 32)
    static let software = "ferry-fuzz"

    /// The keys of the session the genuine transcript below opens.
    static let sessionKeys = SessionKeys(key: key, sharedSecret: sharedSecret, sourceNonce: sourceNonce, destinationNonce: destinationNonce)
    static let session = String(repeating: "0f", count: 16)

    /// A genuine handshake: hello, welcome with the destination's proof, auth with the source's.
    static let helloPayload = ControlCoding.encode(HelloMessage(
        software: software, host: "source", auth: AuthOffer(keyID: key.id, nonce: sourceNonce, share: sourceShare)))
    static let welcomePayload = ControlCoding.encode(WelcomeMessage(
        version: ProtocolVersion.current, software: software, host: "destination",
        auth: AuthReply(nonce: destinationNonce, share: destinationShare,
                        proof: Handshake.destinationProof(key: key, helloPayload: helloPayload,
                                                          destinationNonce: destinationNonce, destinationShare: destinationShare,
                                                          version: ProtocolVersion.current))))
    static let authPayload = ControlCoding.encode(AuthMessage(
        proof: Handshake.sourceProof(key: key, helloPayload: helloPayload, welcomePayload: welcomePayload)))
}
