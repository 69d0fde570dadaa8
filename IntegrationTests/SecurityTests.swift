import FerryIO
import FerryLab
@testable import FerryMigration
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

        func connect(from source: String? = nil) throws -> FrameConnection {
            let socket = try Socket.connectTCP(host: "127.0.0.1", port: port, timeout: .seconds(5), source: source)
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
        func genuineHandshake(key: ClusterKey, from source: String? = nil) throws -> (hello: Frame, auth: Frame, connection: FrameConnection) {
            let c = try connect(from: source)
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
        // Silent connections, and one that says nothing but a header: each told why and closed
        // once the first-frame deadline (5 s) has passed.
        var silent: [Socket] = []
        for _ in 0..<40 { silent.append(try Socket.connectTCP(host: "127.0.0.1", port: d.port, timeout: .seconds(5))) }
        let header = try d.connect()
        try header.socket.writeAll(FrameHeader(type: .hello, length: 500, payloadCRC: 0).encoded())
        header.socket.setReceiveTimeout(.seconds(8))
        let reply = try #require(d.errorReply(header), "no reply to a connection that never finished its hello")
        #expect(reply.message.contains("no hello or bind within 5 s"), "\(reply)")
        #expect(GuestConsole(path: d.directory + "/serve.log").wait(timeout: .seconds(3)) { $0.contains("sent no whole first frame within 5 s") })
        silent.forEach { $0.close() }

        #expect(ProcessStats.isAlive(pid: d.pid), "the daemon died")
        _ = try d.genuineHandshake(key: d.keys.primary)
        #expect(GuestConsole(path: d.directory + "/serve.log").wait(timeout: .seconds(5)) { $0.contains("source authenticated") })
    }

    @Test("floods of silent and garbage connections, 64 and 1,000, from one address and from several, do not keep a genuine handshake out; the log stays short")
    func floods() throws {
        Flood.raiseDescriptorLimit()
        let d = try Daemon()
        let many = (2...9).map { "127.0.0.\($0)" }
        var scenarios: [(name: String, count: Int, addresses: [String], kind: Flood.Kind, seconds: Double)] = [
            ("64 silent, from the source's own address", 64, ["127.0.0.1"], .silent, 2),
            ("1,000 silent, from 8 addresses, through the 5 s deadline", 1000, many, .silent, 6.5),
            ("1,000 silent, from the source's own address", 1000, ["127.0.0.1"], .silent, 2),
            ("1,000 held open with half a frame, and garbage, from 8 addresses", 1000, many, .garbage, 2),
        ]
        // A bigger flood for a manual run (about 30 s more): FERRY_TEST_BIG_FLOOD=1.
        if ProcessInfo.processInfo.environment["FERRY_TEST_BIG_FLOOD"] != nil {
            scenarios.append(("5,000 silent, from 32 addresses", 5000, (2...33).map { "127.0.0.\($0)" }, .silent, 8))
            scenarios.append(("5,000 held open with half a frame, and garbage, from 32 addresses", 5000, (2...33).map { "127.0.0.\($0)" }, .garbage, 8))
        }
        var authenticated = 0
        for scenario in scenarios {
            let logBefore = d.log.split(separator: "\n").count
            let flood = try Flood(port: d.port, count: scenario.count, addresses: scenario.addresses, kind: scenario.kind)
            Thread.sleep(forTimeInterval: 0.3)
            // Genuine handshakes, one after another, while the flood goes on.
            var times: [Duration] = []
            let end = ContinuousClock.now + .seconds(scenario.seconds)
            repeat {
                let start = ContinuousClock.now
                let (_, _, c) = try d.genuineHandshake(key: d.keys.primary)
                times.append(.now - start)
                authenticated += 1
                c.close()
                Thread.sleep(forTimeInterval: 0.2)
            } while ContinuousClock.now < end
            let threads = ProcessStats.threadCount(pid: d.pid) ?? 0
            let floodSeconds = flood.stop()
            let worst = times.max()!
            let median = times.sorted()[times.count / 2]
            print("flood \(scenario.name): \(times.count) genuine handshakes, median \(median.milliseconds) ms, worst \(worst.milliseconds) ms; "
                  + "\(flood.opened) flood connections in \(String(format: "%.1f", floodSeconds)) s; daemon threads \(threads)")
            #expect(worst < .seconds(2), "\(scenario.name): a genuine handshake took \(worst)")
            #expect(threads < 60, "\(scenario.name): the daemon runs \(threads) threads: held connections must not cost a thread each")
            #expect(GuestConsole(path: d.directory + "/serve.log").wait(timeout: .seconds(5)) { log in
                log.components(separatedBy: "source authenticated").count - 1 == authenticated
            }, "\(scenario.name): not every genuine handshake was authenticated")
            // At most 5 refusals a second on lines of their own and one summary line a second.
            Thread.sleep(forTimeInterval: 1.2)
            let lines = d.log.split(separator: "\n").dropFirst(logBefore).filter { $0.contains("refused") || $0.contains("shed") }
            #expect(Double(lines.count) <= (floodSeconds + 2) * 6, "\(scenario.name): \(lines.count) log lines in \(floodSeconds) s")
            if scenario.count > 512 || scenario.seconds > 5 {
                #expect(lines.contains { $0.contains("refused or shed connections") }, "\(scenario.name): no summary line")
            }
        }
        #expect(ProcessStats.isAlive(pid: d.pid), "the daemon died")
        // And once a flood ends, the door is empty again: a handshake from a flooding address.
        Thread.sleep(forTimeInterval: 0.5)
        _ = try d.genuineHandshake(key: d.keys.primary, from: "127.0.0.2")
    }

    /// Connections held open against the daemon as the issue's script did: `count` of them
    /// spread over `addresses` (127.0.0.x, all on loopback), each reopened as soon as the
    /// daemon closes it.
    // `sockets` and `opened` are touched only by the churning thread once it runs, and by
    // `stop()` after it ended; `stopping` is locked.
    final class Flood: @unchecked Sendable {
        enum Kind {
            /// Connect and say nothing.
            case silent
            /// Nine in ten send a valid header announcing a hello, and 10 bytes of it, then
            /// nothing (held open until the daemon's deadline); one in ten sends 64 random
            /// bytes, refused at once, and is reopened at once.
            case garbage
        }
        let host: String
        let port: UInt16
        let kind: Kind
        let addresses: [String]
        private var sockets: [Socket?]
        private(set) var opened = 0
        private let stopping = Locked(false)
        private let done = Locked(false)
        private let start = ContinuousClock.now

        init(host: String = "127.0.0.1", port: UInt16, count: Int, addresses: [String], kind: Kind) throws {
            self.host = host
            self.port = port
            self.kind = kind
            self.addresses = addresses
            sockets = Array(repeating: nil, count: count)
            for index in 0..<count { sockets[index] = open(index) }
            startThread("flood") { [self] in churn() }
        }

        private func open(_ index: Int) -> Socket? {
            guard let socket = try? Socket.connectTCP(host: host, port: port, timeout: .seconds(2), source: addresses[index % addresses.count]) else { return nil }
            opened += 1
            switch kind {
            case .silent:
                break
            case .garbage where index % 10 == 0:
                try? socket.writeAll((0..<64).map { _ in UInt8.random(in: 0...255) })
            case .garbage:
                try? socket.writeAll(FrameHeader(type: .hello, length: 600, payloadCRC: 0).encoded() + Array(repeating: 0x7b, count: 10))
            }
            return socket
        }

        /// Every 100 ms: reopens what the daemon closed (or what could not be opened).
        private func churn() {
            var buffer = [UInt8](repeating: 0, count: 4096)
            while !stopping.withLock({ $0 }) {
                for index in sockets.indices {
                    if let socket = sockets[index] {
                        guard socket.waitReadable(timeout: .zero) else { continue }
                        let n = buffer.withUnsafeMutableBytes { Glibc.recv(socket.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                        guard n <= 0 else { continue }  // an error frame; the close follows
                        socket.close()
                    }
                    sockets[index] = open(index)
                }
                Thread.sleep(forTimeInterval: 0.1)
            }
            done.withLock { $0 = true }
        }

        /// Ends the flood and closes its connections; returns how long it ran, in seconds.
        func stop() -> Double {
            stopping.withLock { $0 = true }
            while !done.withLock({ $0 }) { Thread.sleep(forTimeInterval: 0.02) }
            for socket in sockets { socket?.close() }
            return (ContinuousClock.now - start).seconds
        }

        /// Room for a flood of 5,000 and the daemon's side of it (the hard limit allows).
        static func raiseDescriptorLimit() {
            var limit = rlimit()
            guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        }
    }
}

/// The door's rules as values, without a daemon: who is shed, and what the log says.
@Suite("Security: shedding and the refusal log, as values")
struct DoorRuleTests {
    let t0 = ContinuousClock.now

    @Test("a full line sheds the oldest connection of the address holding the most, never a lone source's")
    func shedsTheBusiestAddress() {
        var line = DoorLine(capacity: 4)
        #expect(line.admit(id: 1, address: "source", at: t0) == nil)
        for id in 2...4 { #expect(line.admit(id: id, address: "flood", at: t0 + .milliseconds(id)) == nil) }
        // Full: the next one, from anywhere, pushes out the flood's oldest.
        #expect(line.admit(id: 5, address: "flood", at: t0 + .milliseconds(5))?.id == 2)
        #expect(line.admit(id: 6, address: "other", at: t0 + .milliseconds(6))?.id == 3)
        #expect(line.entries.map(\.id) == [1, 4, 5, 6])
        // The flood still holds two (4, 5): its oldest goes, not the older source.
        #expect(line.admit(id: 7, address: "x", at: t0 + .milliseconds(7))?.id == 4)
        // Now every address holds one: the oldest overall goes, the source's, only then.
        #expect(line.admit(id: 8, address: "y", at: t0 + .milliseconds(8))?.id == 1)
    }

    @Test("remove, expire and shed keep the per-address counts right")
    func bookkeeping() {
        var line = DoorLine(capacity: 10)
        for id in 1...6 { _ = line.admit(id: id, address: id % 2 == 0 ? "a" : "b", at: t0 + .seconds(id)) }
        #expect(line.remove(id: 3)?.address == "b")
        #expect(line.remove(id: 3) == nil)
        #expect(line.expire(before: t0 + .milliseconds(2500)).map(\.id) == [1, 2])
        #expect(line.entries.map(\.id) == [4, 5, 6])
        // a holds 4 and 6, b holds 5: a's oldest goes.
        #expect(line.shedOne()?.id == 4)
        #expect(line.shedOne()?.id == 5)  // one each: the oldest overall
        #expect(line.shedOne()?.id == 6)
        #expect(line.shedOne() == nil)
        #expect(line.count == 0)
    }

    @Test("the log: five refusals a second on lines of their own, sheds never, the rest in one summary a second")
    func tally() {
        var tally = RefusalTally()
        var detailed = 0
        for i in 0..<10 { if tally.note(.refused, address: "10.0.0.\(i % 2)", at: t0 + .milliseconds(i)) { detailed += 1 } }
        #expect(detailed == 5)
        let shedAlone = tally.note(.shed, address: "10.0.0.9", at: t0 + .milliseconds(20))
        let silentAlone = tally.note(.silent, address: "10.0.0.9", at: t0 + .milliseconds(30))
        #expect(!shedAlone && !silentAlone, "sheds never get a line of their own; the budget is spent")
        #expect(tally.summary(at: t0 + .milliseconds(500)) == nil, "not before its second is over")
        let summary = tally.summary(at: t0 + .seconds(1))
        #expect(summary?.refused == 5 && summary?.shed == 1 && summary?.silent == 1 && summary?.addresses == 3)
        #expect(summary?.busiest.first?.count == 3)
        #expect(tally.summary(at: t0 + .seconds(3)) == nil, "nothing held back, nothing to say")
        // A new second: a refusal gets its own line again.
        let again = tally.note(.refused, address: "10.0.0.1", at: t0 + .seconds(4))
        #expect(again)
        #expect(tally.summary(at: t0 + .seconds(5)) == nil)
    }
}
