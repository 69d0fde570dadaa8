import Crypto
import FerryIO
import Foundation
import Testing
@testable import FerryTransport
@testable import FerryWire

/// The control link over real TCP on 127.0.0.1: connections killed under it while frames
/// flow both ways, sealed and not; every frame arrives once, in order.
@Suite("Control link over loopback", .serialized)
struct ControlLinkTests {
    /// A source and a destination link, and a listener playing the destination daemon's
    /// door for rejoining connections (as `MigrationServer` does: read `rejoin`, adopt).
    final class Pair: @unchecked Sendable {
        let listener: Socket
        var source: ControlLink!
        var destination: ControlLink!
        /// Every connection either side used, to kill one from outside.
        let sourceConnections = Locked<[FrameConnection]>([])
        let refusals = Locked<[String]>([])
        let keys: (toDestination: SymmetricKey, toSource: SymmetricKey)?
        let notes = Locked<[String]>([])
        var doorRunning = true

        init(sealed: Bool, movable: Bool = true, rejoinTimeout: Duration = .seconds(5),
             rejoinFails: Bool = false) throws {
            signal(SIGPIPE, SIG_IGN)
            keys = sealed ? (SymmetricKey(size: .bits256), SymmetricKey(size: .bits256)) : nil
            listener = try Socket.listenTCP(host: "127.0.0.1", port: 0)
            let port = listener.localPort
            let first = try Socket.connectTCP(host: "127.0.0.1", port: port)
            let accepted = try #require(try listener.accept(timeout: .seconds(5)))
            let s = FrameConnection(socket: first), d = FrameConnection(socket: accepted)
            secure(s, generation: 0, source: true)
            secure(d, generation: 0, source: false)
            sourceConnections.withLock { $0.append(s) }
            var options = ControlLink.Options(movable: movable)
            options.rejoinTimeout = rejoinTimeout
            let connections = sourceConnections
            let notes = self.notes
            source = ControlLink(s, role: .source, options: options, path: "first", rejoiner: { [self] generation, received, attempt, _ in
                if rejoinFails { throw SocketError("connect to", peer: "nowhere", kind: .timedOut) }
                let socket = try Socket.connectTCP(host: "127.0.0.1", port: port)
                let c = FrameConnection(socket: socket)
                try c.send(.rejoin, RejoinMessage(version: 2, session: "s", generation: generation, received: received, interface: "lo", proof: ""))
                socket.setReceiveTimeout(.seconds(3))
                let answer = try c.expect(.rejoined, as: RejoinedMessage.self)
                secure(c, generation: generation, source: true)
                connections.withLock { $0.append(c) }
                return .init(connection: c, peerReceived: answer.received, interface: nil, path: "try \(attempt)")
            }, note: { text in notes.withLock { $0.append(text) } })
            var destinationOptions = options
            destinationOptions.rejoinTimeout = rejoinTimeout + .seconds(5)
            destination = ControlLink(d, role: .destination, options: destinationOptions, path: "first")
            startThread("test-door") { [self] in door() }
        }

        func secure(_ c: FrameConnection, generation: UInt32, source: Bool) {
            guard let keys else { return }
            let number = ControlRejoin.sealNumber(generation: generation)
            let (send, receive) = source ? (keys.toDestination, keys.toSource) : (keys.toSource, keys.toDestination)
            c.secure(send: FrameSealer(key: send, connection: number), receive: FrameOpener(key: receive, connection: number))
        }

        private func door() {
            while doorRunning {
                guard let socket = try? listener.accept(timeout: .milliseconds(200)) else { continue }
                let c = FrameConnection(socket: socket)
                socket.setReceiveTimeout(.seconds(3))
                do {
                    let rejoin = try c.expect(.rejoin, as: RejoinMessage.self)
                    try destination.adopt(c, rejoin: rejoin, answer: { RejoinedMessage(generation: rejoin.generation, received: $0, proof: "") },
                                          secure: { self.secure($0, generation: rejoin.generation, source: false) })
                } catch {
                    refusals.withLock { $0.append("\(error)") }
                    c.close()
                }
            }
        }

        /// Shuts the link's current connection from outside, as a dead NIC or a reset does.
        func killSourceConnection() {
            sourceConnections.withLock { $0.last }?.socket.shutdown()
        }

        /// Kills the current connection and waits (up to 5 s) for the source to have made
        /// the next one.
        func killAndAwaitRejoin() {
            let count = sourceConnections.withLock { $0.count }
            killSourceConnection()
            let deadline = ContinuousClock.now + .seconds(5)
            while sourceConnections.withLock({ $0.count }) == count && ContinuousClock.now < deadline {
                Thread.sleep(forTimeInterval: 0.01)
            }
        }

        func close() {
            doorRunning = false
            source.close()
            destination.close()
            listener.close()
        }
    }

    /// `count` numbered status frames from `link`, with a connection killed after each
    /// index in `killAfter`.
    static func sendNumbered(_ link: ControlLink, count: Int, prefix: String, killAfter: Set<Int> = [], kill: () -> Void = {}) throws {
        for i in 0..<count {
            try link.send(.status, StatusMessage(text: "\(prefix) \(i)"))
            if killAfter.contains(i) { kill() }
        }
    }

    static func receiveNumbered(_ link: ControlLink, count: Int) throws -> [String] {
        var texts: [String] = []
        while texts.count < count {
            guard let frame = try link.receive(timeout: .seconds(20)) else { break }
            texts.append(try ControlCoding.decode(StatusMessage.self, from: frame).text)
        }
        return texts
    }

    @Test("connections killed mid-stream, both directions at once: every frame arrives once, in order", arguments: [false, true])
    func killedConnections(sealed: Bool) throws {
        let pair = try Pair(sealed: sealed)
        defer { pair.close() }
        let n = 400
        let fromDestination = Locked<[String]>([])
        let back = Thread { fromDestination.withLock { $0 = (try? Self.receiveNumbered(pair.source, count: n)) ?? [] } }
        back.start()
        let sender = Thread { try? Self.sendNumbered(pair.destination, count: n, prefix: "d") }
        sender.start()
        try Self.sendNumbered(pair.source, count: n, prefix: "s", killAfter: [100, 250]) { pair.killAndAwaitRejoin() }
        let atDestination = try Self.receiveNumbered(pair.destination, count: n)
        #expect(atDestination == (0..<n).map { "s \($0)" })
        let deadline = ContinuousClock.now + .seconds(20)
        while fromDestination.withLock({ $0.count }) < n && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.05) }
        #expect(fromDestination.withLock { $0 } == (0..<n).map { "d \($0)" })
        #expect(pair.source.moves == 2, "\(pair.notes.withLock { $0 })")
        let notes = pair.notes.withLock { $0 }
        #expect(notes.count == 2 && notes.allSatisfy { $0.contains("continued over") }, "\(notes)")
    }

    @Test("frames sent while no connection exists go out on the next one")
    func sendWhileDown() throws {
        let pair = try Pair(sealed: true)
        defer { pair.close() }
        try pair.source.send(.status, StatusMessage(text: "before"))
        #expect(try Self.receiveNumbered(pair.destination, count: 1) == ["before"])
        pair.killSourceConnection()
        // At once, before the source can have rejoined: kept, not lost, not an error.
        try Self.sendNumbered(pair.source, count: 5, prefix: "during")
        #expect(try Self.receiveNumbered(pair.destination, count: 5) == (0..<5).map { "during \($0)" })
        // The source counts the move once its rejoin is answered, which may come just after
        // the destination has the frames the new connection carried.
        let deadline = ContinuousClock.now + .seconds(5)
        while pair.source.moves < 1 && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.01) }
        #expect(pair.source.moves == 1)
    }

    @Test("a rejoin whose connection number was used before is refused (a replayed rejoin)")
    func replayedRejoin() throws {
        let pair = try Pair(sealed: false)
        defer { pair.close() }
        pair.killSourceConnection()
        try pair.source.send(.status, StatusMessage(text: "x"))
        #expect(try Self.receiveNumbered(pair.destination, count: 1) == ["x"])
        // Generation 1 is taken now; someone replays a rejoin as 1.
        let replay = try Socket.connectTCP(host: "127.0.0.1", port: pair.listener.localPort)
        let c = FrameConnection(socket: replay)
        try c.send(.rejoin, RejoinMessage(version: 2, session: "s", generation: 1, received: 0, interface: "lo", proof: ""))
        let deadline = ContinuousClock.now + .seconds(5)
        while pair.refusals.withLock({ $0.isEmpty }) && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.05) }
        #expect(pair.refusals.withLock { $0.first?.contains("used already") } == true, "\(pair.refusals.withLock { $0 })")
        // The link goes on undisturbed.
        try pair.source.send(.status, StatusMessage(text: "y"))
        #expect(try Self.receiveNumbered(pair.destination, count: 1) == ["y"])
        c.close()
    }

    @Test("no way back within the rejoin timeout: the link fails, naming why")
    func rejoinTimeout() throws {
        let pair = try Pair(sealed: false, rejoinTimeout: .seconds(1), rejoinFails: true)
        defer { pair.close() }
        pair.killSourceConnection()
        let started = ContinuousClock.now
        #expect {
            _ = try pair.source.receive(timeout: .seconds(10))
        } throws: { error in
            "\(error)".contains("no new one reached the destination within 1 s")
        }
        #expect(ContinuousClock.now - started < .seconds(5))
        #expect(throws: ControlLink.Failure.self) { try pair.source.send(.status, StatusMessage(text: "late")) }
    }

    @Test("protocol v1: nothing moves; the first break fails the link")
    func unmovable() throws {
        let pair = try Pair(sealed: false, movable: false)
        defer { pair.close() }
        try pair.source.send(.status, StatusMessage(text: "one"))
        #expect(try Self.receiveNumbered(pair.destination, count: 1) == ["one"])
        pair.killSourceConnection()
        #expect(throws: ControlLink.Failure.self) { _ = try pair.source.receive(timeout: .seconds(5)) }
        #expect(throws: ControlLink.Failure.self) { _ = try pair.destination.receive(timeout: .seconds(5)) }
        #expect(pair.source.moves == 0)
    }

    @Test("a peer that confirms more frames than were sent fails the link")
    func overConfirmed() throws {
        let pair = try Pair(sealed: false)
        defer { pair.close() }
        let raw = try #require(pair.sourceConnections.withLock { $0.first })
        // Written straight to the connection: the destination's link reads it as the source's.
        try raw.send(.received, ReceivedMessage(received: 1000))
        #expect {
            _ = try pair.destination.receive(timeout: .seconds(5))
        } throws: { error in
            "\(error)".contains("confirmed 1000 control frames")
        }
    }
}
