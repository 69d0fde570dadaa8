import Crypto
import FerryIO
import Foundation
import Logging
import Testing
@testable import FerryTransport
@testable import FerryWire

/// Two-way streams (protocol 3) over real TCP channels on 127.0.0.1: a stream that carries
/// bytes both ways beside QEMU's one-way migration stream, half-closes that reach the far
/// end on their own, a channel that dies with chunks of both directions on it, priority.
@Suite("Two-way streams over loopback", .serialized)
struct TwoWayStreamTests {
    /// A source and a destination data path joined by `channels` TCP connections, and the
    /// control connection's part played by `pump` (stream ends, each to the other side).
    // Set up and read by the test's thread; the paths' threads reach only `Locked` state.
    final class Pair: @unchecked Sendable {
        let source: SourceDataPath
        let destination: DestinationDataPath
        let sourceEvents = Locked<[DataPathEvent]>([])
        let destinationEvents = Locked<[DataPathEvent]>([])
        let failure = Locked<TransportError?>(nil)
        var sourceChannels: [FrameConnection] = []
        var destinationChannels: [FrameConnection] = []
        /// The migration stream's bytes as the "destination QEMU" read them.
        let migrationReceived = Locked<[UInt8]?>(nil)

        init(channels: Int, migrationStreams: Int = 0, window: Int = ChunkPolicy.windowByteCount, sealed: Bool = true) throws {
            signal(SIGPIPE, SIG_IGN)
            let logger = Logger(label: "test")
            let sourceEvents = self.sourceEvents, destinationEvents = self.destinationEvents, failure = self.failure
            source = SourceDataPath(scheduler: SendScheduler(windowByteCount: window), twoWay: true, logger: logger) { e in
                sourceEvents.withLock { $0.append(e) }
            }
            let migrationReceived = self.migrationReceived
            destination = DestinationDataPath(streamCount: migrationStreams, twoWay: true, logger: logger, connector: { _ in
                let (near, far) = try Socket.pair(name: "qemu")
                Thread { migrationReceived.withLock { $0 = Self.readAll(far) } }.start()
                return near
            }, onFailure: { e in failure.withLock { $0 = e } })
            destination.onReverseEvent = { e in destinationEvents.withLock { $0.append(e) } }
            let keys = (SymmetricKey(size: .bits256), SymmetricKey(size: .bits256))
            let listener = try Socket.listenTCP(host: "127.0.0.1", port: 0)
            for id in 0..<channels {
                let c = FrameConnection(socket: try Socket.connectTCP(host: "127.0.0.1", port: listener.localPort))
                let d = FrameConnection(socket: try #require(try listener.accept(timeout: .seconds(5))))
                if sealed {
                    c.secure(send: FrameSealer(key: keys.0, connection: UInt32(id)), receive: FrameOpener(key: keys.1, connection: UInt32(id)))
                    d.secure(send: FrameSealer(key: keys.1, connection: UInt32(id)), receive: FrameOpener(key: keys.0, connection: UInt32(id)))
                }
                sourceChannels.append(c)
                destinationChannels.append(d)
                destination.addChannel(id, connection: d)
                source.addChannel(id, connection: c, interface: "lo\(id)")
            }
        }

        static func readAll(_ socket: Socket) -> [UInt8] {
            var buf = [UInt8](repeating: 0, count: 1 << 16)
            var all: [UInt8] = []
            while let n = try? buf.withUnsafeMutableBytes({ try socket.read(into: $0) }), n > 0 { all.append(contentsOf: buf[0..<n]) }
            return all
        }

        /// Writes `data` in uneven pieces.
        static func writeUneven(_ socket: Socket, _ data: [UInt8]) {
            var i = 0, step = 7
            while i < data.count {
                let n = min(step, data.count - i)
                guard (try? data[i..<i + n].withUnsafeBytes({ try socket.writeAll($0) })) != nil else { return }
                i += n
                step = step * 5 % 700_001 + 1
            }
        }

        /// Hands every half's end to the other side, as the control connection does, until
        /// `forward` and `reverse` ends have crossed (or the time is up).
        func pumpEnds(forward: Int, reverse: Int, timeout: Duration = .seconds(30)) throws {
            var crossed = Set<UInt32>()
            let deadline = ContinuousClock.now + timeout
            func ends(_ events: Locked<[DataPathEvent]>) -> [StreamEndMessage] {
                events.current.compactMap { if case .streamEnded(let m) = $0 { m } else { nil } }.filter { !crossed.contains($0.stream) }
            }
            while crossed.count < forward + reverse && ContinuousClock.now < deadline && failure.current == nil {
                for end in ends(sourceEvents) {
                    try destination.streamEnded(end)
                    crossed.insert(end.stream)
                }
                for end in ends(destinationEvents) {
                    try source.reverse!.streamEnded(end)
                    crossed.insert(end.stream)
                }
                Thread.sleep(forTimeInterval: 0.002)
            }
            try #require(failure.current == nil, "the destination failed: \(failure.current!)")
            try #require(crossed.count == forward + reverse, "ends crossed: \(crossed.sorted())")
        }

        func close() {
            source.markFinished()
            source.closeChannels()
            source.shutdown(reason: "test over")
            destination.stop()
        }
    }

    static func payload(_ seed: Int, _ size: Int) -> [UInt8] {
        var x = UInt64(seed) &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<size).map { _ in
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            return UInt8(truncatingIfNeeded: x)
        }
    }

    /// A "server" at the destination that reads the request to its end and only then
    /// answers and closes: the answer can come only if the client's half-close came through
    /// while the other direction stayed open.
    static func answeringServer(_ socket: Socket, answer: [UInt8], got: Locked<[UInt8]?>) {
        Thread {
            got.withLock { $0 = Pair.readAll(socket) }
            Pair.writeUneven(socket, answer)
            socket.shutdownWrite()
        }.start()
    }

    @Test("a two-way stream carries a request one way and its answer back, each half closed on its own, beside a migration stream")
    func requestAndAnswer() throws {
        let p = try Pair(channels: 3, migrationStreams: 1)
        let stream = StreamID.firstTwoWay
        let request = Self.payload(1, 5_000_003), answer = Self.payload(2, 3_000_001), migration = Self.payload(3, 4_000_000)
        // The migration stream, one-way as always.
        let (qemu, ferryMigration) = try Socket.pair(name: "src-qemu")
        p.source.addStream(0, socket: ferryMigration)
        Thread { Pair.writeUneven(qemu, migration); qemu.close() }.start()
        // The two-way stream: a client at the source, a server at the destination.
        let (client, ferryEnd) = try Socket.pair(name: "client")
        try p.source.openTwoWay(stream: stream, socket: ferryEnd)
        let (server, ferryServerEnd) = try Socket.pair(name: "server")
        try p.destination.openTwoWay(stream: stream, socket: ferryServerEnd)
        let got = Locked<[UInt8]?>(nil), answered = Locked<[UInt8]?>(nil)
        Self.answeringServer(server, answer: answer, got: got)
        Thread {
            Pair.writeUneven(client, request)
            client.shutdownWrite()
            answered.withLock { $0 = Pair.readAll(client) }
        }.start()
        // Three halves end: the migration stream, the request, the answer.
        try p.pumpEnds(forward: 2, reverse: 1)
        try p.destination.waitUntilComplete(timeout: .seconds(30))
        let deadline = ContinuousClock.now + .seconds(20)
        while (answered.current == nil || p.migrationReceived.current == nil) && ContinuousClock.now < deadline {
            Thread.sleep(forTimeInterval: 0.01)
        }
        #expect(got.current == request)
        #expect(answered.current == answer)
        #expect(p.migrationReceived.current == migration)
        #expect(p.destination.isWritten(half: stream))
        #expect(p.source.reverse!.isWritten(half: StreamID.reverse(stream)))
        // The reverse half was striped over the channels like the forward one.
        #expect(p.destination.reverse!.channelStats.filter { $0.payloadBytes > 0 }.count >= 2)
        try p.source.scheduler.waitUntilAllAcknowledged(timeout: .seconds(10))
        try p.destination.reverse!.scheduler.waitUntilAllAcknowledged(timeout: .seconds(10))
        p.close()
    }

    @Test("a channel that dies with chunks of both directions on it loses nothing either way")
    func failover() throws {
        // Small windows keep chunks of both directions in flight on every channel.
        let p = try Pair(channels: 3, window: 2 << 20)
        let stream = StreamID.firstTwoWay + 7
        let up = Self.payload(4, 20_000_000)
        // An echo server: every byte comes back (so both directions run at once).
        let (server, serverEnd) = try Socket.pair(name: "echo")
        let (client, clientEnd) = try Socket.pair(name: "client")
        try p.source.openTwoWay(stream: stream, socket: clientEnd)
        try p.destination.openTwoWay(stream: stream, socket: serverEnd)
        Thread {
            var buf = [UInt8](repeating: 0, count: 1 << 16)
            while let n = try? buf.withUnsafeMutableBytes({ try server.read(into: $0) }), n > 0 {
                guard (try? buf[0..<n].withUnsafeBytes({ try server.writeAll($0) })) != nil else { return }
            }
            server.shutdownWrite()
        }.start()
        let echoed = Locked<[UInt8]?>(nil)
        Thread { echoed.withLock { $0 = Pair.readAll(client) } }.start()
        Thread { Pair.writeUneven(client, up); client.shutdownWrite() }.start()
        // Once both directions have chunks in flight, channel 1 dies under them.
        let deadline = ContinuousClock.now + .seconds(20)
        while (p.source.scheduler.inFlightCount(onChannel: 1) == 0 || p.destination.reverse!.scheduler.outstanding == 0)
                && ContinuousClock.now < deadline {
            Thread.sleep(forTimeInterval: 0.0002)
        }
        p.sourceChannels[1].socket.shutdown()
        try p.pumpEnds(forward: 1, reverse: 1)
        let done = ContinuousClock.now + .seconds(20)
        while echoed.current == nil && ContinuousClock.now < done { Thread.sleep(forTimeInterval: 0.01) }
        #expect(echoed.current == up)
        #expect(p.source.channelStats.first { $0.channel == 1 }?.alive == false)
        #expect(p.destination.reverse!.channelStats.first { $0.channel == 1 }?.alive == false)
        #expect(p.failure.current == nil)
        p.close()
    }

    @Test("a high-priority stream's chunks go ahead of everything queued, and first again after a failover")
    func priority() throws {
        let s = SendScheduler()
        s.addChannel(0)
        s.addChannel(1)
        let urgent = StreamID.reverse(StreamID.firstTwoWay)
        s.setHighPriority(stream: urgent)
        for i in 0..<4 { try s.enqueue(Self.chunk(0, UInt64(i))) }
        try s.enqueue(Self.chunk(urgent, 0))
        #expect(s.next(for: 0)?.header.stream == urgent)
        #expect(s.next(for: 0)?.header.sequence == 0)
        try s.enqueue(Self.chunk(urgent, 1))
        #expect(s.next(for: 1)?.header.stream == urgent)
        // Channel 1 dies holding the urgent chunk: it goes again before the bulk's.
        #expect(s.channelFailed(1, reason: "test") == 1)
        let again = try #require(s.next(for: 0))
        #expect(again.header.stream == urgent && again.header.sequence == 1)
        #expect(s.next(for: 0)?.header.sequence == 1)
        s.fail(.aborted("test over"))
    }

    static func chunk(_ stream: UInt32, _ sequence: UInt64) -> Chunk {
        Chunk(header: DataChunkHeader(stream: stream, sequence: sequence, offset: sequence * 100),
              buffer: ChunkBuffer(copying: [UInt8](repeating: 1, count: 100)))
    }

    @Test("two-way streams are refused where they cannot be: without protocol 3, under a migration stream's number, opened twice, or unopened at the source")
    func refusals() throws {
        let logger = Logger(label: "test")
        let oneWay = SourceDataPath(scheduler: SendScheduler(), logger: logger) { _ in }
        let (a, b) = try Socket.pair(name: "x")
        #expect(throws: TransportError.self) { try oneWay.openTwoWay(stream: StreamID.firstTwoWay, socket: a) }
        let p = try Pair(channels: 1)
        #expect(throws: TransportError.self) { try p.source.openTwoWay(stream: 1, socket: a) }
        #expect(throws: TransportError.self) { try p.destination.openTwoWay(stream: StreamID.firstTwoWay + StreamID.twoWayLimit, socket: b) }
        try p.destination.openTwoWay(stream: StreamID.firstTwoWay, socket: b)
        #expect(throws: TransportError.self) { try p.destination.openTwoWay(stream: StreamID.firstTwoWay, socket: a) }
        // A reverse chunk for a half the source never opened is a protocol violation there.
        let buffer = ChunkBuffer(copying: [7])
        #expect(throws: TransportError.self) {
            try p.source.reverse!.deliver(DataChunkHeader(stream: StreamID.reverse(StreamID.firstTwoWay + 1), sequence: 0, offset: 0), .memory(buffer))
        }
        // At the destination only two-way numbers may arrive before their stream is opened.
        #expect(throws: TransportError.self) {
            try p.destination.deliver(DataChunkHeader(stream: 3, sequence: 0, offset: 0), .memory(buffer))
        }
        try p.destination.deliver(DataChunkHeader(stream: StreamID.firstTwoWay + 2, sequence: 0, offset: 0), .memory(buffer))
        p.close()
        oneWay.shutdown(reason: "test over")
    }
}
