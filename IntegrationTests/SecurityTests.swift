import FerryIO
import FerryLab
import FerryMigration
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Testing

/// The real daemon, on 127.0.0.1 in the root namespace, against a peer written here that
/// can say anything: recorded handshakes, wrong keys, forged binds, garbage, floods.
@Suite("Security: the daemon against hostile peers", .serialized, .enabled(if: Env.canRunLab, "needs root and the built ferry binary"))
struct SecurityTests {
    /// A `ferry serve` of our own, with a fresh state directory and key.
    final class Daemon: @unchecked Sendable {
        let directory: String
        let keyPath: String
        let keys: KeyRing
        let port: UInt16 = UInt16.random(in: 20000...29999)
        let pid: Int32
        var log: String { (try? String(contentsOfFile: directory + "/serve.log", encoding: .utf8)) ?? "" }

        init() throws {
            directory = NSTemporaryDirectory() + "ferry-sec-\(UUID().uuidString.prefix(8))"
            try FileManager.default.createDirectory(atPath: directory + "/state", withIntermediateDirectories: true)
            keyPath = directory + "/cluster.key"
            keys = KeyRing(keys: [.generate()])
            _ = FileManager.default.createFile(atPath: keyPath, contents: Data(keys.fileText.utf8), attributes: [.posixPermissions: 0o600])
            let process = Process()
            process.executableURL = URL(fileURLWithPath: Env.ferry)
            process.arguments = ["serve", "--listen", "127.0.0.1:\(port)", "--key-file", keyPath, "--state-dir", directory + "/state"]
            var env = ProcessInfo.processInfo.environment
            env["FERRY_HOST_NAME"] = "secured"
            process.environment = env
            _ = FileManager.default.createFile(atPath: directory + "/serve.log", contents: nil)
            let handle = FileHandle(forWritingAtPath: directory + "/serve.log")!
            process.standardOutput = handle
            process.standardError = handle
            try process.run()
            pid = process.processIdentifier
            let deadline = ContinuousClock.now + .seconds(10)
            while !log.contains("listening on") && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.05) }
        }

        deinit {
            ProcessStats.terminate(pid: pid)
            try? FileManager.default.removeItem(atPath: directory)
        }

        func connect() throws -> FrameConnection {
            let socket = try Socket.connectTCP(host: "127.0.0.1", port: port, timeout: .seconds(5))
            socket.setReceiveTimeout(.seconds(15))
            return FrameConnection(socket: socket)
        }

        /// The reply to a peer that misbehaved: the error frame the daemon sent, if any.
        func errorReply(_ c: FrameConnection) -> ErrorMessage? {
            guard let frame = try? c.receive(), frame.type == .error else { return nil }
            return try? ControlCoding.decode(ErrorMessage.self, from: frame)
        }

        /// A whole, genuine handshake as `ferry migrate` does it; returns what a recorder on
        /// the wire would have captured (the hello and auth frames).
        func genuineHandshake(key: ClusterKey) throws -> (hello: Frame, auth: Frame, connection: FrameConnection) {
            let c = try connect()
            let nonce = Handshake.newNonce()
            let hello = ControlCoding.frame(.hello, HelloMessage(software: "test", host: "recorder",
                                                                 auth: AuthOffer(keyID: key.id, nonce: nonce, share: EphemeralKey().share)))
            try c.send(hello)
            let welcomeFrame = try c.receiveChecked()
            let welcome = try ControlCoding.decode(WelcomeMessage.self, from: welcomeFrame)
            let reply = try #require(welcome.auth)
            #expect(Handshake.equal(reply.proof, Handshake.destinationProof(key: key, helloPayload: hello.payload, destinationNonce: reply.nonce,
                                                                             destinationShare: reply.share, version: welcome.version)),
                    "the daemon proved the key")
            let auth = ControlCoding.frame(.auth, AuthMessage(proof: Handshake.sourceProof(key: key, helloPayload: hello.payload, welcomePayload: welcomeFrame.payload)))
            try c.send(auth)
            return (hello, auth, c)
        }
    }

    @Test("a genuine handshake is accepted; the same handshake replayed, a wrong key, a wrong proof and an unauthenticated hello are refused with clear errors")
    func handshakes() throws {
        let d = try Daemon()
        let key = d.keys.primary
        let (hello, auth, genuine) = try d.genuineHandshake(key: key)
        #expect(GuestConsole(path: d.directory + "/serve.log").wait(timeout: .seconds(5)) { $0.contains("source authenticated") })
        genuine.close()

        // Replay: the recorded hello gets a fresh nonce, so the recorded proof no longer fits.
        let replay = try d.connect()
        try replay.send(hello)
        let welcome = try ControlCoding.decode(WelcomeMessage.self, from: try replay.receiveChecked())
        #expect(welcome.auth != nil)
        try replay.send(auth)
        let replayed = try #require(d.errorReply(replay), "a replayed handshake was not refused")
        #expect(replayed.code == .authenticationFailed && replayed.message.contains("did not prove"), "\(replayed)")

        // A key the daemon does not hold.
        let other = ClusterKey.generate()
        let stranger = try d.connect()
        try stranger.send(.hello, HelloMessage(software: "test", host: "x", auth: AuthOffer(keyID: other.id, nonce: Handshake.newNonce(), share: EphemeralKey().share)))
        let unknown = try #require(d.errorReply(stranger))
        #expect(unknown.code == .authenticationFailed && unknown.message.contains("not one this host holds"), "\(unknown)")

        // The right key id, but proof made with another key (a peer that guessed the id).
        let guesser = try d.connect()
        let guessHello = ControlCoding.frame(.hello, HelloMessage(software: "test", host: "x", auth: AuthOffer(keyID: key.id, nonce: Handshake.newNonce(), share: EphemeralKey().share)))
        try guesser.send(guessHello)
        let guessWelcome = try guesser.receiveChecked()
        try guesser.send(.auth, AuthMessage(proof: Handshake.sourceProof(key: other, helloPayload: guessHello.payload, welcomePayload: guessWelcome.payload)))
        #expect(d.errorReply(guesser)?.code == .authenticationFailed)

        // No authentication at all (a source run with --insecure).
        let plain = try d.connect()
        try plain.send(.hello, HelloMessage(software: "test", host: "x"))
        let refused = try #require(d.errorReply(plain))
        #expect(refused.message.contains("requires authentication"), "\(refused)")

        // A bind with a made-up session, and an offer before any handshake.
        let binder = try d.connect()
        try binder.send(.bind, BindMessage(version: 1, session: Hex.random(byteCount: 16), channel: 0, interface: "x", proof: Hex.random(byteCount: 32)))
        #expect(d.errorReply(binder)?.code == .unknownSession)

        // Every refusal is logged with the peer's address.
        let refusals = d.log.split(separator: "\n").filter { $0.contains("refused") }
        #expect(refusals.count >= 5, "\(d.log)")
        #expect(refusals.allSatisfy { $0.contains("127.0.0.1") }, "\(refusals)")

        // And it still serves.
        _ = try d.genuineHandshake(key: key)
        #expect(ProcessStats.isAlive(pid: d.pid))
    }

    @Test("garbage of every length, truncated frames and a flood of silent connections: each refused, the daemon keeps serving")
    func garbage() throws {
        let d = try Daemon()
        var lengths = Array(0...24) + [39, 40, 41, 100, 4095, 4096, 65_537, 1 << 20]
        lengths.append(5 << 20)
        for length in lengths {
            let c = try d.connect()
            var bytes = (0..<length).map { _ in UInt8.random(in: 0...255) }
            // Half of them start like a Ferry frame, to get past the magic.
            if length >= 4 && length % 2 == 0 { bytes.replaceSubrange(0..<4, with: [0x46, 0x45, 0x52, 0x59]) }
            try? c.socket.writeAll(bytes)
            c.socket.shutdownWrite()
            _ = try? c.receive()  // an error frame, or the close
            c.close()
        }
        // A valid header announcing more than the limit, and a hello cut short.
        let huge = FrameHeader(type: .hello, length: UInt32(FrameHeader.maximumPayloadByteCount + 1), payloadCRC: 0).encoded()
        let cut = Array(ControlCoding.frame(.hello, HelloMessage(software: "t", host: "x")).encoded().dropLast(3))
        for bytes in [huge, cut] {
            let c = try d.connect()
            try c.socket.writeAll(bytes)
            c.socket.shutdownWrite()
            _ = try? c.receive()
            c.close()
        }
        // More silent connections than the daemon lets wait: the excess is dropped at once.
        var silent: [Socket] = []
        for _ in 0..<40 { silent.append(try Socket.connectTCP(host: "127.0.0.1", port: d.port, timeout: .seconds(5))) }
        #expect(GuestConsole(path: d.directory + "/serve.log").wait(timeout: .seconds(5)) { $0.contains("too many unidentified connections") })
        silent.forEach { $0.close() }
        Thread.sleep(forTimeInterval: 0.5)

        #expect(ProcessStats.isAlive(pid: d.pid), "the daemon died")
        _ = try d.genuineHandshake(key: d.keys.primary)
        #expect(GuestConsole(path: d.directory + "/serve.log").wait(timeout: .seconds(5)) { $0.contains("source authenticated") })
    }
}
