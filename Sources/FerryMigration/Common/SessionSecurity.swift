import Crypto
import FerryIO
import FerryTransport
import FerryWire
import Foundation

/// What one migration session uses to authenticate and seal its connections: keys derived
/// from the cluster key by the handshake, or nothing when both hosts run `--insecure`.
struct SessionSecurity: Sendable {
    /// nil: insecure (frames travel in the clear, the bind key is sent in `accept`).
    let keys: SessionKeys?
    /// The key data channels prove knowledge of when they bind.
    let bindKey: [UInt8]
    let keyID: String?

    static func authenticated(_ keys: SessionKeys, keyID: String) -> SessionSecurity {
        SessionSecurity(keys: keys, bindKey: keys.bind, keyID: keyID)
    }

    static func insecure() -> SessionSecurity {
        SessionSecurity(keys: nil, bindKey: Hex.decode(Hex.random(byteCount: 32))!, keyID: nil)
    }

    /// For the report and the logs.
    var summary: String {
        if let keyID { return "AES-256-GCM, hosts authenticated by cluster key \(keyID)" }
        return "none (--insecure: unauthenticated, unencrypted)"
    }

    enum Side { case source, destination }

    /// Seals the control connection from the next frame on: the first one, or the one
    /// that took over as `generation` (``ControlRejoin``).
    func secureControl(_ connection: FrameConnection, as side: Side, generation: UInt32 = 0) {
        guard let keys else { return }
        secure(connection, number: ControlRejoin.sealNumber(generation: generation), as: side,
               toDestination: keys.controlToDestination, toSource: keys.controlToSource)
    }

    /// Seals data channel `channel` from the next frame on.
    func secureData(_ connection: FrameConnection, channel: UInt32, as side: Side) {
        guard let keys else { return }
        secure(connection, number: channel, as: side, toDestination: keys.dataToDestination, toSource: keys.dataToSource)
    }

    /// Each side sends under the key of its direction and receives under the other.
    private func secure(_ connection: FrameConnection, number: UInt32, as side: Side,
                        toDestination: SymmetricKey, toSource: SymmetricKey) {
        let (send, receive) = side == .source ? (toDestination, toSource) : (toSource, toDestination)
        connection.secure(send: FrameSealer(key: send, connection: number), receive: FrameOpener(key: receive, connection: number))
    }
}

/// The handshake's two halves, each run on the control connection right after it opens.
enum HandshakeRunner {
    /// Source: sends `hello`, checks the destination's proof, proves its own, and returns
    /// the welcome and the session's security. Throws ``SecurityError`` on any mismatch.
    static func source(_ control: FrameConnection, keys ring: KeyRing?, host: String) throws -> (WelcomeMessage, SessionSecurity) {
        let nonce = Handshake.newNonce()
        let ephemeral = EphemeralKey()
        let hello = ControlCoding.frame(.hello, HelloMessage(software: FerryVersion.software, host: host,
                                                             auth: ring.map { AuthOffer(keyID: $0.primary.id, nonce: nonce, share: ephemeral.share) }))
        try control.send(hello)
        let welcomeFrame = try control.receiveChecked()
        guard welcomeFrame.type == .welcome else { throw WireError.unexpectedFrame(welcomeFrame.type, expected: "welcome") }
        let welcome = try ControlCoding.decode(WelcomeMessage.self, from: welcomeFrame)
        switch (ring, welcome.auth) {
        case (let ring?, let reply?):
            let key = ring.primary
            guard Handshake.validNonce(reply.nonce) else { throw SecurityError.authenticationFailed("the destination's nonce is malformed") }
            let expected = Handshake.destinationProof(key: key, helloPayload: hello.payload, destinationNonce: reply.nonce,
                                                      destinationShare: reply.share, version: welcome.version)
            guard Handshake.equal(expected, reply.proof) else {
                throw SecurityError.authenticationFailed("the destination did not prove it holds cluster key \(key.id)")
            }
            let secret = try ephemeral.agree(with: reply.share)
            try control.send(.auth, AuthMessage(proof: Handshake.sourceProof(key: key, helloPayload: hello.payload, welcomePayload: welcomeFrame.payload)))
            let keys = SessionKeys(key: key, sharedSecret: secret, sourceNonce: nonce, destinationNonce: reply.nonce)
            let security = SessionSecurity.authenticated(keys, keyID: key.id)
            security.secureControl(control, as: .source)
            return (welcome, security)
        case (_?, nil):
            throw SecurityError.authenticationFailed("the destination runs --insecure: refusing to send the VM unauthenticated and unencrypted")
        case (nil, _?):
            throw SecurityError.authenticationFailed("the destination answered with authentication to an --insecure hello")
        case (nil, nil):
            return (welcome, .insecure())
        }
    }

    /// Destination: answers `hello` (already read), checks the source's proof and returns
    /// the session's security. Throws ``ErrorMessage`` with the code to send back.
    static func destination(_ control: FrameConnection, hello helloFrame: Frame, keys ring: KeyRing?, host: String) throws -> (HelloMessage, UInt16, SessionSecurity) {
        let hello = try ControlCoding.decode(HelloMessage.self, from: helloFrame)
        guard let version = ProtocolVersion.negotiate(peerMin: hello.minVersion, peerMax: hello.maxVersion) else {
            throw ErrorMessage(code: .unsupportedVersion,
                               message: "the source speaks protocol v\(hello.minVersion)-v\(hello.maxVersion), this host v\(ProtocolVersion.oldestSupported)-v\(ProtocolVersion.current)")
        }
        switch (ring, hello.auth) {
        case (let ring?, let offer?):
            guard let key = ring.key(id: offer.keyID) else {
                throw ErrorMessage(code: .authenticationFailed, message: "the source's cluster key \(offer.keyID) is not one this host holds")
            }
            guard Handshake.validNonce(offer.nonce) else {
                throw ErrorMessage(code: .authenticationFailed, message: "the source's nonce is malformed")
            }
            let ephemeral = EphemeralKey()
            let secret: [UInt8]
            do {
                secret = try ephemeral.agree(with: offer.share)
            } catch {
                throw ErrorMessage(code: .authenticationFailed, message: "\(error)")
            }
            let nonce = Handshake.newNonce()
            let proof = Handshake.destinationProof(key: key, helloPayload: helloFrame.payload, destinationNonce: nonce,
                                                   destinationShare: ephemeral.share, version: version)
            let welcome = ControlCoding.frame(.welcome, WelcomeMessage(version: version, software: FerryVersion.software, host: host,
                                                                       auth: AuthReply(nonce: nonce, share: ephemeral.share, proof: proof),
                                                                       postcopyProblem: HostInfo.postcopyProblem))
            try control.send(welcome)
            let auth = try control.expect(.auth, as: AuthMessage.self)
            let expected = Handshake.sourceProof(key: key, helloPayload: helloFrame.payload, welcomePayload: welcome.payload)
            guard Handshake.equal(expected, auth.proof) else {
                throw ErrorMessage(code: .authenticationFailed, message: "the source did not prove it holds cluster key \(key.id)")
            }
            let keys = SessionKeys(key: key, sharedSecret: secret, sourceNonce: offer.nonce, destinationNonce: nonce)
            let security = SessionSecurity.authenticated(keys, keyID: key.id)
            security.secureControl(control, as: .destination)
            return (hello, version, security)
        case (_?, nil):
            throw ErrorMessage(code: .authenticationFailed, message: "this host requires authentication and the source runs --insecure")
        case (nil, _?):
            throw ErrorMessage(code: .authenticationFailed, message: "this host runs --insecure and holds no cluster key; it will not pretend to authenticate")
        case (nil, nil):
            try control.send(.welcome, WelcomeMessage(version: version, software: FerryVersion.software, host: host,
                                                      postcopyProblem: HostInfo.postcopyProblem))
            return (hello, version, .insecure())
        }
    }
}
