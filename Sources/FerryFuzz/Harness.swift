import FerryWire
import Foundation

/// One fuzz input through everything in FerryWire that reads bytes from a peer or a file:
/// the frame decoder (whole, byte by byte, in splits the input chooses), every message
/// decoder, the handshake as each side runs it, the key file parser and frame opening.
///
/// Nothing here may crash, trap or hang on any input. The `precondition`s are the
/// invariants of the code under test; a failing one is a bug the fuzzer found.
func fuzzOne(_ data: UnsafeRawBufferPointer) {
    let bytes = Array(data)
    FrameFuzzing.run(bytes)
    FrameFuzzing.typedPayload(bytes)
    HandshakeFuzzing.run(bytes)
    KeyFileFuzzing.run(bytes)
    SealFuzzing.run(bytes)
    StateFileFuzzing.run(bytes)
}

// MARK: - Frames

enum FrameFuzzing {
    /// What a decoder made of a byte stream: the frames, then the error that stopped it
    /// (nil if it ran out of bytes), and how many bytes the frames took.
    struct Outcome: Equatable {
        var frames: [Frame] = []
        var error: WireError?
        var consumedByteCount = 0
    }

    static func run(_ bytes: [UInt8]) {
        if bytes.count >= FrameHeader.byteCount {
            header(Array(bytes[0..<FrameHeader.byteCount]))
        }
        let whole = decode(bytes, pieces: [0..<bytes.count])
        // However the bytes arrive, the decoder sees the same frames and fails the same way.
        precondition(decode(bytes, pieces: (0..<bytes.count).map { $0..<$0 + 1 }) == whole,
                     "byte-by-byte decoding differs from decoding the whole input")
        precondition(decode(bytes, pieces: inputSizedPieces(bytes)) == whole,
                     "decoding in input-sized pieces differs from decoding the whole input")
        let cut = Int(CRC32C.checksum(bytes) % UInt32(bytes.count + 1))
        precondition(decode(bytes, pieces: [0..<cut, cut..<bytes.count]) == whole,
                     "decoding in two pieces split at \(cut) differs from decoding the whole input")

        // The frames are exactly the bytes the decoder consumed: re-encoding gives them back.
        let reencoded = whole.frames.flatMap { $0.encoded() }
        precondition(reencoded[...] == bytes[0..<whole.consumedByteCount], "re-encoded frames differ from the bytes they came from")
        precondition(decode(reencoded, pieces: [0..<reencoded.count]) == Outcome(frames: whole.frames, consumedByteCount: reencoded.count),
                     "re-encoded frames do not decode to themselves")

        for frame in whole.frames { message(frame) }
    }

    /// The input as one payload of the type its first byte names, skipping the checksums
    /// the fuzzer would otherwise have to forge before reaching the message decoders.
    static func typedPayload(_ bytes: [UInt8]) {
        guard let first = bytes.first else { return }
        let types = FrameType.allCases.filter { $0 != .invalid }
        let type = types[Int(first) % types.count]
        message(Frame(type: type, payload: Array(bytes.dropFirst())))
    }

    static func header(_ raw: [UInt8]) {
        let parsed = raw.withUnsafeBytes { r in Result { () throws(WireError) in try FrameHeader.parse(r) } }
        guard case .success(let header) = parsed else { return }
        precondition(header.type != .invalid, "a header of type 0 was accepted")
        precondition(Int(header.length) <= FrameHeader.maximumPayloadByteCount, "an oversized length was accepted")
        precondition(header.encoded() == raw, "a parsed header re-encodes to other bytes")
    }

    static func decode(_ bytes: [UInt8], pieces: [Range<Int>]) -> Outcome {
        var decoder = FrameDecoder()
        var outcome = Outcome()
        var fed = 0
        for piece in pieces {
            decoder.feed(bytes[piece])
            fed = piece.upperBound
            do throws(WireError) {
                while let frame = try decoder.next() { outcome.frames.append(frame) }
            } catch {
                outcome.error = error
                break
            }
        }
        outcome.consumedByteCount = fed - decoder.bufferedByteCount
        return outcome
    }

    /// Pieces of 1 to 32 bytes, their sizes taken from the input itself, so that the
    /// fuzzer steers where the splits fall.
    static func inputSizedPieces(_ bytes: [UInt8]) -> [Range<Int>] {
        var pieces: [Range<Int>] = []
        var start = 0
        var i = 0
        while start < bytes.count {
            let size = 1 + Int(bytes[i % bytes.count] & 31)
            let end = min(start + size, bytes.count)
            pieces.append(start..<end)
            start = end
            i += 1
        }
        return pieces
    }

    /// A frame's payload through the decoder its type calls for, as the daemon would.
    static func message(_ frame: Frame) {
        precondition(frame.type != .invalid, "the decoder yielded a frame of type 0")
        if frame.flags.contains(.sealed) { SealFuzzing.open(frame) }
        switch frame.type {
        case .invalid: break
        case .hello:
            if json(HelloMessage.self, frame) != nil { HandshakeFuzzing.hello(frame.payload) }
        case .welcome:
            if json(WelcomeMessage.self, frame) != nil { HandshakeFuzzing.welcome(frame.payload) }
        case .auth:
            if json(AuthMessage.self, frame) != nil { HandshakeFuzzing.auth(frame.payload) }
        case .error: _ = json(ErrorMessage.self, frame)
        case .offer:
            if let offer = json(OfferMessage.self, frame) { _ = VMSpec.validateName(offer.spec.name) }
        case .accept:
            if let accept = json(AcceptMessage.self, frame) { _ = Hex.decode(accept.bindKey) }
        case .ready: _ = json(ReadyMessage.self, frame)
        case .bind:
            if let bind = json(BindMessage.self, frame) {
                channelProof(bind.proof, session: bind.session, channel: bind.channel, role: .bind)
            }
        case .bound:
            if let bound = json(BoundMessage.self, frame) {
                channelProof(bound.proof, session: Fixtures.session, channel: bound.channel, role: .bound)
            }
        case .streamOpen: _ = json(StreamOpenMessage.self, frame)
        case .streamEnd: _ = json(StreamEndMessage.self, frame)
        case .loaded: _ = json(LoadedMessage.self, frame)
        case .commit: _ = json(CommitMessage.self, frame)
        case .committed: _ = json(CommittedMessage.self, frame)
        case .abort: _ = json(AbortMessage.self, frame)
        case .status: _ = json(StatusMessage.self, frame)
        case .limit: _ = json(LimitMessage.self, frame)
        case .resolve: _ = json(ResolveMessage.self, frame)
        case .resolved: _ = json(ResolvedMessage.self, frame)
        case .hostQuery: _ = json(HostQueryMessage.self, frame)
        case .hostInfo: _ = json(HostInfoMessage.self, frame)
        case .postcopyDone: _ = json(PostcopyDoneMessage.self, frame)
        case .libvirtOffer:
            if let offer = json(LibvirtOfferMessage.self, frame) { _ = LibvirtOfferMessage.isDirectoryName(offer.directory) }
        case .rejoin:
            if let rejoin = json(RejoinMessage.self, frame) {
                rejoinProof(rejoin.proof, session: rejoin.session, generation: rejoin.generation, received: rejoin.received, role: .rejoin)
            }
        case .rejoined:
            if let rejoined = json(RejoinedMessage.self, frame) {
                rejoinProof(rejoined.proof, session: Fixtures.session, generation: rejoined.generation, received: rejoined.received, role: .rejoined)
            }
        case .received: _ = json(ReceivedMessage.self, frame)
        case .data: dataChunk(frame.payload)
        case .ack:
            if let ack = try? AckMessage.decode(frame.payload) {
                precondition(ack.encoded() == frame.payload, "an ack re-encodes to other bytes")
            }
        case .file:
            if let chunk = try? FileChunkMessage.decode(frame.payload) {
                precondition(chunk.encoded() == frame.payload, "a file chunk re-encodes to other bytes")
            }
        }
    }

    /// Decodes a control message; one that decodes survives a round trip through JSON.
    static func json<M: Codable & Equatable>(_ type: M.Type, _ frame: Frame) -> M? {
        guard let message = try? ControlCoding.decode(M.self, from: frame) else { return nil }
        let again = try? ControlCoding.decode(M.self, from: ControlCoding.frame(frame.type, message))
        precondition(again == message, "\(M.self) does not survive re-encoding")
        return message
    }

    static func dataChunk(_ payload: [UInt8]) {
        let parsed = payload.withUnsafeBytes { r in Result { () throws(WireError) in try DataChunkHeader.parse(r) } }
        guard case .success(let header) = parsed else {
            precondition(payload.count < DataChunkHeader.byteCount, "a data chunk with a whole sub-header was refused")
            return
        }
        var raw = [UInt8](repeating: 0, count: DataChunkHeader.byteCount)
        raw.withUnsafeMutableBytes { header.write(into: $0) }
        precondition(raw[...] == payload[0..<DataChunkHeader.byteCount], "a data sub-header re-encodes to other bytes")
    }

    /// A rejoin or rejoined proof from the wire, checked under the fixed bind key.
    static func rejoinProof(_ proof: String, session: String, generation: UInt32, received: UInt64, role: ControlRejoin.Role) {
        let key = Fixtures.sessionKeys.bind
        let accepted = ControlRejoin.verify(proof: proof, bindKey: key, session: session, generation: generation, received: received, role: role)
        let expected = ControlRejoin.proof(bindKey: key, session: session, generation: generation, received: received, role: role)
        precondition(accepted == (Array(proof.utf8) == Array(expected.utf8)), "a rejoin proof check disagrees with the proof")
    }

    /// A bind or bound proof from the wire, checked under the fixed bind key.
    static func channelProof(_ proof: String, session: String, channel: UInt32, role: ChannelBinding.Role) {
        let key = Fixtures.sessionKeys.bind
        let accepted = ChannelBinding.verify(proof: proof, bindKey: key, session: session, channel: channel, role: role)
        let expected = ChannelBinding.proof(bindKey: key, session: session, channel: channel, role: role)
        precondition(accepted == (Array(proof.utf8) == Array(expected.utf8)), "a channel proof check disagrees with the proof")
    }
}

// MARK: - The handshake

/// The handshake parser on both sides: the input as the hello a destination receives, the
/// welcome a source receives and the auth a destination receives, checked like
/// `HandshakeRunner` in FerryMigration checks them, against the fixed key and transcript.
enum HandshakeFuzzing {
    static func run(_ bytes: [UInt8]) {
        hello(bytes)
        welcome(bytes)
        auth(bytes)
        // Proof comparison is byte equality, whatever the strings hold (Unicode
        // canonical equivalence included: String's == is not the check).
        let half = bytes.count / 2
        let a = String(decoding: bytes[..<half], as: UTF8.self), b = String(decoding: bytes[half...], as: UTF8.self)
        precondition(Handshake.equal(a, b) == (Array(a.utf8) == Array(b.utf8)), "Handshake.equal is not byte equality")
        precondition(Handshake.equal(a, a), "Handshake.equal is not reflexive")
    }

    /// Destination: a hello from a source. A hello the destination can answer leads to a
    /// handshake both sides complete, and one no stranger can complete.
    static func hello(_ payload: [UInt8]) {
        guard let hello = try? ControlCoding.decode(HelloMessage.self, from: Frame(type: .hello, payload: payload)) else { return }
        let version = ProtocolVersion.negotiate(peerMin: hello.minVersion, peerMax: hello.maxVersion)
        if let version {
            precondition(version >= hello.minVersion && version <= hello.maxVersion, "negotiated a version the source does not speak")
            precondition(version >= ProtocolVersion.oldestSupported && version <= ProtocolVersion.current,
                         "negotiated a version this build does not speak")
        }
        guard let offer = hello.auth, let key = Fixtures.ring.key(id: offer.keyID) else { return }
        precondition(key.id == offer.keyID, "the key ring returned a key with another id")
        guard Handshake.validNonce(offer.nonce), let version else { return }
        precondition(Hex.decode(offer.nonce)?.count == Handshake.nonceByteCount, "a malformed nonce was accepted")

        // The destination answers...
        // A share that is not a valid X25519 public key is refused, never a crash.
        _ = try? EphemeralKey().agree(with: offer.share)
        let proofD = Handshake.destinationProof(key: key, helloPayload: payload, destinationNonce: Fixtures.destinationNonce,
                                                destinationShare: Fixtures.destinationShare, version: version)
        let welcomeFrame = ControlCoding.frame(.welcome, WelcomeMessage(
            version: version, software: Fixtures.software, host: "destination",
            auth: AuthReply(nonce: Fixtures.destinationNonce, share: Fixtures.destinationShare, proof: proofD)))
        // ...the source, which sent this hello, checks the answer and proves its key...
        guard let welcome = try? ControlCoding.decode(WelcomeMessage.self, from: welcomeFrame), let reply = welcome.auth else {
            preconditionFailure("a welcome the harness encoded does not decode")
        }
        precondition(Handshake.validNonce(reply.nonce), "the destination's own nonce is malformed")
        let expectedD = Handshake.destinationProof(key: key, helloPayload: payload, destinationNonce: reply.nonce,
                                                   destinationShare: reply.share, version: welcome.version)
        precondition(Handshake.equal(expectedD, reply.proof), "the source refuses a genuine destination proof")
        let strangerD = Handshake.destinationProof(key: Fixtures.strangerKey, helloPayload: payload, destinationNonce: reply.nonce,
                                                   destinationShare: reply.share, version: welcome.version)
        precondition(!Handshake.equal(strangerD, reply.proof), "a destination proof verifies under another key")
        let proofS = Handshake.sourceProof(key: key, helloPayload: payload, welcomePayload: welcomeFrame.payload)
        // ...and the destination checks that proof over the exchange it saw.
        let expectedS = Handshake.sourceProof(key: key, helloPayload: payload, welcomePayload: welcomeFrame.payload)
        precondition(Handshake.equal(expectedS, proofS), "the destination refuses a genuine source proof")
        let tampered = Handshake.sourceProof(key: key, helloPayload: payload, welcomePayload: welcomeFrame.payload + [0x20])
        precondition(!Handshake.equal(tampered, proofS), "a source proof ignores the welcome it covers")
        _ = SessionKeys(key: key, sharedSecret: Fixtures.sharedSecret, sourceNonce: offer.nonce, destinationNonce: reply.nonce)
    }

    /// Source: a welcome answering the fixed hello. Its proof verifies exactly when it is
    /// the proof the key gives over that hello and the nonce and version the welcome names.
    static func welcome(_ payload: [UInt8]) {
        guard let welcome = try? ControlCoding.decode(WelcomeMessage.self, from: Frame(type: .welcome, payload: payload)),
              let reply = welcome.auth, Handshake.validNonce(reply.nonce) else { return }
        let expected = Handshake.destinationProof(key: Fixtures.key, helloPayload: Fixtures.helloPayload,
                                                  destinationNonce: reply.nonce, destinationShare: reply.share, version: welcome.version)
        let accepted = Handshake.equal(expected, reply.proof)
        precondition(accepted == (Array(expected.utf8) == Array(reply.proof.utf8)), "Handshake.equal is not byte equality")
        guard accepted else { return }
        _ = Handshake.sourceProof(key: Fixtures.key, helloPayload: Fixtures.helloPayload, welcomePayload: payload)
        _ = try? EphemeralKey().agree(with: reply.share)
        _ = SessionKeys(key: Fixtures.key, sharedSecret: Fixtures.sharedSecret, sourceNonce: Fixtures.sourceNonce, destinationNonce: reply.nonce)
    }

    /// Destination: the source's auth after the fixed hello and welcome.
    static func auth(_ payload: [UInt8]) {
        guard let auth = try? ControlCoding.decode(AuthMessage.self, from: Frame(type: .auth, payload: payload)) else { return }
        let expected = Handshake.sourceProof(key: Fixtures.key, helloPayload: Fixtures.helloPayload, welcomePayload: Fixtures.welcomePayload)
        let accepted = Handshake.equal(expected, auth.proof)
        precondition(accepted == (Array(expected.utf8) == Array(auth.proof.utf8)), "Handshake.equal is not byte equality")
    }
}

// MARK: - Key files

enum KeyFileFuzzing {
    /// The input as a key file. A file that parses writes back to one that parses the same.
    static func run(_ bytes: [UInt8]) {
        guard let ring = try? KeyRing.parse(String(decoding: bytes, as: UTF8.self)) else { return }
        precondition(!ring.keys.isEmpty, "a key ring without keys")
        precondition((try? KeyRing.parse(ring.fileText)) == ring, "a key ring does not survive its own file text")
        for key in ring.keys {
            precondition(ring.key(id: key.id)?.id == key.id, "a key cannot be found by its id")
        }
    }
}

// MARK: - Sealed frames

/// Frame opening with the fixed session's keys. What opens is exactly what sealing the
/// plaintext gives: anything else (tampered, truncated, random) must throw.
enum SealFuzzing {
    static func run(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { raw in
            let control = Fixtures.sessionKeys.controlToDestination
            // The input as a sealed control payload, the first frame on the connection.
            let opener = FrameOpener(key: control, connection: FrameSeal.controlConnection)
            if let plain = try? opener.open(.status, .sealed, raw) {
                let again = plain.withUnsafeBytes { p in
                    FrameSealer(key: control, connection: FrameSeal.controlConnection).seal(.status, .sealed, p)
                }
                precondition(Array(again) == bytes, "a sealed control payload opened but is not what sealing gives")
            }
            // The input as a data chunk: a clear sub-header, then ciphertext and tag.
            if raw.count >= DataChunkHeader.byteCount {
                let header = UnsafeRawBufferPointer(rebasing: raw[..<DataChunkHeader.byteCount])
                let sealed = UnsafeRawBufferPointer(rebasing: raw[DataChunkHeader.byteCount...])
                let data = Fixtures.sessionKeys.dataToDestination
                if let plain = try? FrameOpener(key: data, connection: 0).open(.data, .sealed, header: header, sealed) {
                    let again = plain.withUnsafeBytes { p in
                        FrameSealer(key: data, connection: 0).seal(.data, .sealed, header: header, p)
                    }
                    precondition(Array(again)[...] == bytes[DataChunkHeader.byteCount...],
                                 "a sealed data chunk opened but is not what sealing gives")
                }
            }
            // And the other way: whatever is sealed opens to itself, once, on its connection.
            let sealer = FrameSealer(key: control, connection: 7)
            let sealed = sealer.seal(.status, .sealed, raw)
            let receiver = FrameOpener(key: control, connection: 7)
            let opened = sealed.withUnsafeBytes { s in try? receiver.open(.status, .sealed, s) }
            precondition(opened.map(Array.init) == bytes, "a sealed payload does not open to itself")
            let replayed = sealed.withUnsafeBytes { s in try? receiver.open(.status, .sealed, s) }
            precondition(replayed == nil, "a replayed sealed payload opened")
        }
    }

    /// A frame flagged sealed, opened as the first frame of its connection.
    static func open(_ frame: Frame) {
        let keys = Fixtures.sessionKeys
        frame.payload.withUnsafeBytes { raw in
            if frame.type == .data {
                guard raw.count >= DataChunkHeader.byteCount else { return }
                _ = try? FrameOpener(key: keys.dataToDestination, connection: 0)
                    .open(.data, frame.flags, header: UnsafeRawBufferPointer(rebasing: raw[..<DataChunkHeader.byteCount]),
                          UnsafeRawBufferPointer(rebasing: raw[DataChunkHeader.byteCount...]))
            } else {
                _ = try? FrameOpener(key: keys.controlToDestination, connection: FrameSeal.controlConnection)
                    .open(frame.type, frame.flags, raw)
            }
        }
    }
}
