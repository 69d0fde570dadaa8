import Crypto
import FerryCompress
import FerryIO
import Foundation
import Logging
import Testing
@testable import FerryTransport
@testable import FerryWire

/// The data path over real TCP sockets on 127.0.0.1: several channels, several streams,
/// a channel that dies in the middle.
@Suite("Data path over loopback", .serialized)
struct DataPathTests {
    // `sourceChannels` and `readers` are set up and read by the test's own thread only; the
    // data paths' threads reach the rest, which is immutable or `Locked`.
    final class Harness: @unchecked Sendable {
        let source: SourceDataPath
        let destination: DestinationDataPath
        let events = Locked<[DataPathEvent]>([])
        let received = Locked<[UInt32: [UInt8]]>([:])
        let failure = Locked<TransportError?>(nil)
        var sourceChannels: [FrameConnection] = []
        /// The destination's ends of the channels, to kill one from the far side.
        var destinationChannels: [FrameConnection] = []
        var readers: [Thread] = []
        let done = DispatchGroup()

        init(streams: Int, channels: Int, window: Int = ChunkPolicy.windowByteCount, sealed: Bool = false,
             compression: CompressionMode? = nil, zeroCopy: Bool = false) throws {
            // As `ferry migrate` and `ferry serve` do: a write into a connection the peer
            // closed (a splice has no MSG_NOSIGNAL) is an error to handle, not a signal.
            signal(SIGPIPE, SIG_IGN)
            let toDestination = SymmetricKey(size: .bits256), toSource = SymmetricKey(size: .bits256)
            let logger = Logger(label: "test")
            let events = self.events
            source = SourceDataPath(scheduler: SendScheduler(windowByteCount: window),
                                    compression: compression.map { CompressionController(mode: $0, cores: 2) }, zeroCopy: zeroCopy,
                                    logger: logger) { e in
                events.withLock { $0.append(e) }
            }
            let received = self.received
            let failure = self.failure
            let done = self.done
            for _ in 0..<streams { done.enter() }
            destination = DestinationDataPath(streamCount: streams, logger: logger, connector: { id in
                // The "destination QEMU": a socket pair whose far end a thread drains.
                let (near, far) = try Socket.pair(name: "qemu-\(id)")
                let t = Thread {
                    var buf = [UInt8](repeating: 0, count: 1 << 16)
                    var all: [UInt8] = []
                    while let n = try? buf.withUnsafeMutableBytes({ try far.read(into: $0) }), n > 0 {
                        all.append(contentsOf: buf[0..<n])
                    }
                    received.withLock { $0[id] = all }
                    done.leave()
                }
                t.start()
                return near
            }, onFailure: { e in failure.withLock { $0 = e } })

            let listener = try Socket.listenTCP(host: "127.0.0.1", port: 0)
            for id in 0..<channels {
                let client = try Socket.connectTCP(host: "127.0.0.1", port: listener.localPort)
                let server = try #require(try listener.accept(timeout: .seconds(5)))
                let c = FrameConnection(socket: client)
                let d = FrameConnection(socket: server)
                if sealed {
                    c.secure(send: FrameSealer(key: toDestination, connection: UInt32(id)), receive: FrameOpener(key: toSource, connection: UInt32(id)))
                    d.secure(send: FrameSealer(key: toSource, connection: UInt32(id)), receive: FrameOpener(key: toDestination, connection: UInt32(id)))
                }
                sourceChannels.append(c)
                destinationChannels.append(d)
                destination.addChannel(id, connection: d)
                source.addChannel(id, connection: c, interface: "lo\(id % 2)")
            }
        }

        /// Feeds `data` into stream `id` as QEMU would, in uneven writes.
        func feed(_ id: UInt32, _ data: [UInt8]) throws {
            let (qemu, ferry) = try Socket.pair(name: "src-\(id)")
            source.addStream(id, socket: ferry)
            Thread {
                var i = 0
                var step = 1
                while i < data.count {
                    let n = min(step, data.count - i)
                    try? data[i..<i + n].withUnsafeBytes { try qemu.writeAll($0) }
                    i += n
                    step = step * 3 % 1_000_003 + 1
                }
                qemu.close()
            }.start()
        }

        /// Forwards stream ends to the destination as the control connection would.
        func pumpEnds(expect count: Int, timeout: Duration = .seconds(30)) throws {
            var ended = Set<UInt32>()
            let deadline = ContinuousClock.now + timeout
            while ended.count < count && ContinuousClock.now < deadline {
                let pending = events.withLock { e -> [StreamEndMessage] in
                    let ends = e.compactMap { if case .streamEnded(let m) = $0 { return m } else { return nil } }
                    return ends.filter { !ended.contains($0.stream) }
                }
                for end in pending {
                    try destination.streamEnded(end)
                    ended.insert(end.stream)
                }
                if ended.count == count { source.scheduler.closeInput() }
                Thread.sleep(forTimeInterval: 0.005)
            }
            try #require(ended.count == count, "streams did not all end")
        }
    }

    static func payload(_ seed: Int, _ size: Int) -> [UInt8] {
        var x = UInt64(seed) &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<size).map { _ in
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            return UInt8(truncatingIfNeeded: x)
        }
    }

    @Test("three streams over four channels arrive whole and in order (read and sent, or spliced through pipes)", arguments: [false, true])
    func stripedStreams(zeroCopy: Bool) throws {
        if zeroCopy { try #require(SourceDataPath.zeroCopyAvailable, "this host cannot splice") }
        let h = try Harness(streams: 3, channels: 4, zeroCopy: zeroCopy)
        let data = [Self.payload(1, 3_000_000), Self.payload(2, 9_000_001), Self.payload(3, 17)]
        for (i, d) in data.enumerated() { try h.feed(UInt32(i), d) }
        try h.pumpEnds(expect: 3)
        try h.destination.waitUntilComplete(timeout: .seconds(30))
        try h.source.scheduler.waitUntilAllAcknowledged(timeout: .seconds(10))
        #expect(h.done.wait(timeout: .now() + 10) == .success)
        for (i, d) in data.enumerated() { #expect(h.received.current[UInt32(i)] == d, "stream \(i)") }
        // Every channel carried a share. (Spliced over loopback, one sender can keep up
        // with the readers alone: a sender takes a chunk only when it is free, so there
        // a single channel may carry everything, which is the striping rule working.)
        let shares = h.source.channelStats.map(\.payloadBytes)
        if !zeroCopy { #expect(shares.allSatisfy { $0 > 0 }, "shares \(shares)") }
        #expect(shares.reduce(0, +) >= UInt64(data.map(\.count).reduce(0, +)))
        #expect(h.failure.current == nil)
        // Spliced chunks went through pipes at both ends, read ones through buffers.
        #expect((h.source.pipes?.allocatedCount ?? 0 > 0) == zeroCopy)
        #expect((h.destination.splicedChunkCount > 0) == zeroCopy, "\(h.destination.splicedChunkCount) chunks spliced")
        h.source.markFinished()
        h.source.closeChannels()
        h.destination.stop()
    }

    /// Memory-like data that compresses: runs of a few words, some counters, some noise.
    static func compressible(_ seed: Int, _ size: Int) -> [UInt8] {
        let words = ["session", "user_id", "expires", "null", "true", "{\"token\":", "GET /api/v1/items", "\u{0}\u{0}\u{0}\u{0}"].map { Array($0.utf8) }
        var out: [UInt8] = []
        out.reserveCapacity(size)
        var x = UInt64(seed) | 1
        while out.count < size {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            out += words[Int(x % UInt64(words.count))]
            if x % 5 == 0 { out += withUnsafeBytes(of: x) { Array($0.prefix(3)) } }
        }
        return Array(out.prefix(size))
    }

    @Test("compressed and sealed chunks, every codec, arrive intact; raw data that does not shrink goes raw", arguments: ["lz4", "zstd", "zstd:3"])
    func compressedStreams(codec: String) throws {
        let h = try Harness(streams: 2, channels: 3, sealed: true, compression: try CompressionMode(parsing: codec))
        let data = [Self.compressible(3, 6_000_000), Self.payload(4, 2_000_000)]
        for (i, d) in data.enumerated() { try h.feed(UInt32(i), d) }
        try h.pumpEnds(expect: 2)
        try h.destination.waitUntilComplete(timeout: .seconds(30))
        #expect(h.done.wait(timeout: .now() + 10) == .success)
        for (i, d) in data.enumerated() { #expect(h.received.current[UInt32(i)] == d, "stream \(i)") }
        let stats = h.source.channelStats
        let guest = stats.reduce(0) { $0 + $1.payloadBytes }, wire = stats.reduce(0) { $0 + $1.wireBytes }
        // 6 MB that compress well, 2 MB that do not: the wire carries clearly less.
        #expect(Double(wire) < 0.7 * Double(guest), "\(codec): \(wire) on the wire for \(guest)")
        #expect(wire > 2_000_000, "the random stream went raw")
        #expect(h.failure.current == nil)
        h.source.markFinished()
        h.source.closeChannels()
        h.destination.stop()
    }

    @Test("a compressed chunk that is corrupted (CRC made good), truncated, or claims a wrong size is refused with a clear error",
          arguments: ["corrupt", "truncated", "size"])
    func badCompressedChunk(attack: String) throws {
        let failure = Locked<TransportError?>(nil)
        let drains = Locked<[Socket]>([])
        let destination = DestinationDataPath(streamCount: 1, logger: Logger(label: "test"), connector: { _ in
            let (near, far) = try Socket.pair(name: "qemu")
            drains.withLock { $0.append(far) }
            return near
        }, onFailure: { e in failure.withLock { $0 = e } })
        let (wire, end) = try Socket.pair(name: "wire")
        destination.addChannel(0, connection: FrameConnection(socket: end))

        let raw = Self.compressible(5, 100_000)
        let compressor = Compressor()
        var packed = [UInt8](repeating: 0, count: raw.count)
        let n = try #require(raw.withUnsafeBytes { r in packed.withUnsafeMutableBytes { compressor.compress(.lz4, from: r, into: $0) } })
        packed = Array(packed[..<n])
        var rawSize = UInt32(raw.count)
        switch attack {
        case "corrupt":
            // Flip bits in the middle: the frame's CRC is computed over the damaged bytes,
            // as an attacker or a broken sender would; only the raw CRC stands in the way.
            for i in stride(from: n / 3, to: n / 3 + 40, by: 4) { packed[i] ^= 0x5A }
        case "truncated":
            packed = Array(packed.prefix(n / 2))
        default:
            rawSize += 1000
        }
        var payload = [UInt8](repeating: 0, count: DataChunkHeader.byteCount + CompressionHeader.byteCount)
        payload.withUnsafeMutableBytes {
            DataChunkHeader(stream: 0, sequence: 0, offset: 0).write(into: $0)
            CompressionHeader(codec: 1, rawByteCount: rawSize, rawCRC: CRC32C.checksum(raw))
                .write(into: UnsafeMutableRawBufferPointer(rebasing: $0[DataChunkHeader.byteCount...]))
        }
        try wire.writeAll(Frame(type: .data, flags: [.compressed], payload: payload + packed).encoded())
        let deadline = ContinuousClock.now + .seconds(5)
        while failure.current == nil && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.01) }
        let error = try #require(failure.current, "a bad compressed chunk was accepted (\(attack))")
        #expect("\(error)".contains("compressed chunk 0 of stream 0"), "\(error)")
        #expect(destination.deliveredByteCount == 0, "nothing of it reached QEMU")
        destination.stop()
        wire.close()
    }

    /// The bytes of two sealed data frames as a sealing sender puts them on the wire.
    static func sealedFrames(key: SymmetricKey, chunk: [UInt8]) throws -> [[UInt8]] {
        let (near, far) = try Socket.pair(name: "capture")
        let tx = FrameConnection(socket: near)
        tx.secure(send: FrameSealer(key: key, connection: 0), receive: FrameOpener(key: key, connection: 0))
        let frameSize = FrameHeader.byteCount + DataChunkHeader.byteCount + chunk.count + FrameSeal.tagByteCount
        var frames: [[UInt8]] = []
        for seq in 0..<2 {
            try chunk.withUnsafeBytes { try tx.sendData(DataChunkHeader(stream: 0, sequence: UInt64(seq), offset: UInt64(seq * chunk.count)), bytes: $0) }
            var frame = [UInt8](repeating: 0, count: frameSize)
            try frame.withUnsafeMutableBytes { try far.readExact(into: $0) }
            frames.append(frame)
        }
        near.close()
        far.close()
        return frames
    }

    @Test("a flipped bit (with the CRC made good), a replayed chunk, an unsealed chunk or an unchecked (spliced) one fails the destination with a clear error",
          arguments: ["flip", "replay", "unsealed", "unchecked"])
    func tamperedChunk(attack: String) throws {
        let key = SymmetricKey(size: .bits256)
        let failure = Locked<TransportError?>(nil)
        let drains = Locked<[Socket]>([])
        let destination = DestinationDataPath(streamCount: 1, logger: Logger(label: "test"), connector: { _ in
            let (near, far) = try Socket.pair(name: "qemu")
            drains.withLock { $0.append(far) }
            return near
        }, onFailure: { e in failure.withLock { $0 = e } })
        let (wire, end) = try Socket.pair(name: "wire")
        let rx = FrameConnection(socket: end)
        rx.secure(send: FrameSealer(key: SymmetricKey(size: .bits256), connection: 0), receive: FrameOpener(key: key, connection: 0))
        destination.addChannel(0, connection: rx)

        let chunk = Self.payload(11, 1000)
        var frames = try Self.sealedFrames(key: key, chunk: chunk)
        switch attack {
        case "flip":
            // An attacker who flips a bit also fixes the CRC; only the AEAD tag stands in the way.
            frames[1][FrameHeader.byteCount + DataChunkHeader.byteCount + 100] ^= 0x01
            let header = try frames[1].withUnsafeBytes { try FrameHeader.parse($0) }
            let crc = CRC32C.checksum(Array(frames[1][FrameHeader.byteCount...]))
            frames[1].withUnsafeMutableBytes { FrameHeader(type: .data, flags: header.flags, length: header.length, payloadCRC: crc).write(into: $0) }
        case "replay":
            frames[1] = frames[0]
        case "unchecked":
            // A frame claiming to be spliced (no CRC, no seal check) on a sealed channel.
            var payload = [UInt8](repeating: 0, count: DataChunkHeader.byteCount)
            payload.withUnsafeMutableBytes { DataChunkHeader(stream: 0, sequence: 1, offset: 1000).write(into: $0) }
            frames[1] = FrameHeader(type: .data, flags: [.sealed, .unchecked], length: UInt32(payload.count + chunk.count), payloadCRC: 0).encoded()
                + payload + chunk
        default:
            var payload = [UInt8](repeating: 0, count: DataChunkHeader.byteCount)
            payload.withUnsafeMutableBytes { DataChunkHeader(stream: 0, sequence: 1, offset: 1000).write(into: $0) }
            frames[1] = Frame(type: .data, payload: payload + chunk).encoded()
        }
        for frame in frames { try wire.writeAll(frame) }
        let deadline = ContinuousClock.now + .seconds(5)
        while failure.current == nil && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.01) }
        let error = try #require(failure.current, "the destination accepted a bad chunk (\(attack))")
        let expected = ["unsealed": "unsealed data frame", "unchecked": "unchecked data frame on an authenticated"][attack] ?? "failed authentication"
        #expect("\(error)".contains(expected), "\(error)")
        // The first, genuine chunk was delivered; the bad one was not.
        #expect(destination.deliveredByteCount <= UInt64(chunk.count))
        destination.stop()
        wire.close()
    }

    @Test("memory stays bounded by the window however much is sent (buffers, or pipes when spliced)", arguments: [false, true])
    func boundedMemory(zeroCopy: Bool) throws {
        let window = 2 << 20
        let h = try Harness(streams: 1, channels: 2, window: window, zeroCopy: zeroCopy)
        let data = Self.payload(9, 40_000_000)
        try h.feed(0, data)
        try h.pumpEnds(expect: 1)
        try h.destination.waitUntilComplete(timeout: .seconds(30))
        #expect(h.done.wait(timeout: .now() + 10) == .success)
        #expect(h.received.current[0] == data)
        // The window's worth of buffers, plus one per reader and sender in hand.
        let bound = window / ChunkPolicy.chunkByteCount + 4
        #expect(h.source.allocatedBufferCount <= bound, "\(h.source.allocatedBufferCount) buffers for a \(bound)-buffer window")
        #expect((h.source.pipes?.allocatedCount ?? 0) <= bound, "\(h.source.pipes?.allocatedCount ?? 0) pipes for a \(bound)-chunk window")
        #expect(h.destination.peakBufferedBytes <= window, "destination buffered \(h.destination.peakBufferedBytes)")
        h.source.markFinished()
        h.source.closeChannels()
        h.destination.stop()
    }

    @Test("a channel that dies mid-transfer loses nothing: its chunks go again on the others (sealed with AES-GCM: sealed again there; spliced: sent again from the pipes that kept them)",
          arguments: ["plain", "sealed", "zero-copy"])
    func failover(mode: String) throws {
        let sealed = mode == "sealed"
        if mode == "zero-copy" { try #require(SourceDataPath.zeroCopyAvailable, "this host cannot splice") }
        // A small window keeps chunks in flight on every channel when one dies.
        let h = try Harness(streams: 2, channels: 3, window: 2 << 20, sealed: sealed, zeroCopy: mode == "zero-copy")
        let data = [Self.payload(4, 24_000_000), Self.payload(5, 8_000_000)]
        for (i, d) in data.enumerated() { try h.feed(UInt32(i), d) }
        // Let some data flow, then kill channel 1 under the sender while it holds chunks the
        // destination has not acknowledged yet. Acknowledgements come every few ms, so in
        // the instant between the look and the kill they may all arrive, and there is then
        // nothing to resend: in that case channel 2 is killed the same way (channel 0 is
        // left to carry the rest), so that the resend is always exercised.
        func requeued(on channel: Int) -> Int? {
            h.events.current.lazy.compactMap { event -> Int? in
                if case .channelFailed(channel, _, _, let n) = event { return n } else { return nil }
            }.first
        }
        for channel in [1, 2] {
            let deadline = ContinuousClock.now + .seconds(10)
            while (h.source.streamByteCount < 4_000_000 || h.source.scheduler.inFlightCount(onChannel: channel) == 0)
                    && ContinuousClock.now < deadline {
                Thread.sleep(forTimeInterval: 0.0002)
            }
            h.sourceChannels[channel].socket.shutdown()
            let noticed = ContinuousClock.now + .seconds(5)
            while requeued(on: channel) == nil && ContinuousClock.now < noticed { Thread.sleep(forTimeInterval: 0.001) }
            if (requeued(on: channel) ?? 0) > 0 { break }
        }
        try h.pumpEnds(expect: 2)
        try h.destination.waitUntilComplete(timeout: .seconds(30))
        #expect(h.done.wait(timeout: .now() + 10) == .success)
        for (i, d) in data.enumerated() { #expect(h.received.current[UInt32(i)] == d, "stream \(i)") }
        let failed = h.events.current.contains { if case .channelFailed(1, _, _, _) = $0 { return true } else { return false } }
        #expect(failed)
        #expect(h.source.channelStats.first { $0.channel == 1 }?.alive == false)
        #expect(h.failure.current == nil)
        #expect(h.sourceChannels[0].isSecured == sealed)
        #expect(h.source.scheduler.retransmittedChunks > 0)
        #expect((h.destination.splicedChunkCount > 0) == (mode == "zero-copy"))
        h.source.markFinished()
        h.source.closeChannels()
        h.destination.stop()
    }

    @Test("when every channel dies the transfer fails instead of hanging")
    func allChannelsDie() throws {
        let h = try Harness(streams: 1, channels: 2, window: 1 << 20)
        try h.feed(0, Self.payload(6, 50_000_000))
        while h.source.streamByteCount < 1_000_000 { Thread.sleep(forTimeInterval: 0.001) }
        h.sourceChannels.forEach { $0.socket.shutdown() }
        let deadline = ContinuousClock.now + .seconds(10)
        while h.source.scheduler.failureReason == nil && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.01) }
        guard case .noChannelsLeft? = h.source.scheduler.failureReason else {
            Issue.record("expected noChannelsLeft, got \(String(describing: h.source.scheduler.failureReason))")
            return
        }
        h.source.shutdown(reason: "test over")
        h.destination.stop()
    }

    @Test("a unix socket's send buffer is raised past the kernel's default, which bounds the bytes a writer moves per wake-up")
    func sendBuffer() throws {
        let (a, b) = try Socket.pair(name: "send buffer")
        defer { a.close(); b.close() }
        let before = a.setSendBuffer(0)  // the kernel's floor: shows the option is applied
        let after = a.setSendBuffer(ChunkPolicy.qemuSocketBufferByteCount)
        #expect(after > before)
        // As root (CI, the lab) the buffer may pass net.core.wmem_max; the kernel doubles it.
        if getuid() == 0 { #expect(after >= ChunkPolicy.qemuSocketBufferByteCount) }
        // A writer may now put that much in without blocking, before anyone reads.
        a.setSendTimeout(.milliseconds(500))
        try a.writeAll([UInt8](repeating: 7, count: 2 << 20))
    }

    @Test("garbage on a data channel fails the receiving side cleanly")
    func garbageOnChannel() throws {
        let h = try Harness(streams: 1, channels: 1)
        // A well-formed frame of the wrong type on a data channel is a protocol violation.
        try h.sourceChannels[0].send(Frame(type: .hello, payload: Array("{}".utf8)))
        let deadline = ContinuousClock.now + .seconds(5)
        while h.failure.current == nil && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.01) }
        guard case .protocolViolation? = h.failure.current else {
            Issue.record("expected a protocol violation, got \(String(describing: h.failure.current))")
            return
        }
        h.source.shutdown(reason: "test over")
    }
}

@Suite("Send scheduler")
struct SendSchedulerTests {
    func chunk(_ stream: UInt32, _ seq: UInt64, _ size: Int = 100) -> Chunk {
        Chunk(header: DataChunkHeader(stream: stream, sequence: seq, offset: seq * UInt64(size)),
              buffer: ChunkBuffer(copying: [UInt8](repeating: 1, count: size)))
    }

    @Test("acknowledgements free the window")
    func window() throws {
        let s = SendScheduler(windowByteCount: 250, streamReserveByteCount: 0)
        s.addChannel(0)
        try s.enqueue(chunk(0, 0))
        try s.enqueue(chunk(0, 1))
        #expect(s.outstanding == 200)
        let blocked = Locked(true)
        Thread {
            try? s.enqueue(chunk(0, 2))
            blocked.withLock { $0 = false }
        }.start()
        Thread.sleep(forTimeInterval: 0.1)
        #expect(blocked.current, "the third chunk must wait for the window")
        #expect(s.next(for: 0)?.header.sequence == 0)
        s.acknowledge(stream: 0, nextSequence: 1)
        Thread.sleep(forTimeInterval: 0.1)
        #expect(!blocked.current)
        #expect(s.outstanding == 200)
    }

    @Test("a full window still lets every stream use its reserve, so one stream cannot starve another")
    func reserve() throws {
        let s = SendScheduler(windowByteCount: 300, streamReserveByteCount: 200)
        s.addChannel(0)
        // Stream 1 (a multifd channel the destination QEMU is not reading yet) fills the
        // window and its own reserve.
        for i in 0..<3 { try s.enqueue(chunk(1, UInt64(i))) }
        #expect(s.outstanding == 300)
        let stream1 = Locked(false)
        Thread { try? s.enqueue(chunk(1, 3)); stream1.withLock { $0 = true } }.start()
        // The main stream still gets its two chunks through; the third waits.
        try s.enqueue(chunk(0, 0))
        try s.enqueue(chunk(0, 1))
        let stream0 = Locked(false)
        Thread { try? s.enqueue(chunk(0, 2)); stream0.withLock { $0 = true } }.start()
        Thread.sleep(forTimeInterval: 0.1)
        #expect(!stream1.current && !stream0.current)
        // Acknowledging the main stream frees its reserve.
        s.acknowledge(stream: 0, nextSequence: 1)
        Thread.sleep(forTimeInterval: 0.1)
        #expect(stream0.current)
        #expect(!stream1.current)
        s.fail(.aborted("test over"))
    }

    @Test("a failed channel's chunks are sent again, first, on another channel")
    func requeue() throws {
        let s = SendScheduler()
        s.addChannel(0)
        s.addChannel(1)
        for i in 0..<4 { try s.enqueue(chunk(0, UInt64(i))) }
        #expect(s.next(for: 0)?.header.sequence == 0)
        #expect(s.next(for: 1)?.header.sequence == 1)
        #expect(s.next(for: 0)?.header.sequence == 2)
        #expect(s.channelFailed(0, reason: "test") == 2)
        #expect(s.next(for: 1)?.header.sequence == 0)
        #expect(s.next(for: 1)?.header.sequence == 2)
        #expect(s.next(for: 1)?.header.sequence == 3)
        #expect(s.retransmittedChunks == 2)
        #expect(s.next(for: 0) == nil, "a removed channel gets nothing")
    }

    @Test("a chunk acknowledged while queued for a resend is not sent again")
    func ackedWhileQueued() throws {
        let s = SendScheduler()
        s.addChannel(0)
        s.addChannel(1)
        try s.enqueue(chunk(0, 0))
        try s.enqueue(chunk(0, 1))
        _ = s.next(for: 0)
        _ = s.next(for: 0)
        s.channelFailed(0, reason: "test")
        s.acknowledge(stream: 0, nextSequence: 2)
        #expect(s.outstanding == 0)
        s.closeInput()
        #expect(s.next(for: 1) == nil)
    }

    @Test("losing the last channel fails the scheduler and wakes producers")
    func lastChannel() throws {
        let s = SendScheduler(windowByteCount: 100, streamReserveByteCount: 0)
        s.addChannel(0)
        try s.enqueue(chunk(0, 0))
        let result = Locked<String>("")
        Thread {
            do { try s.enqueue(chunk(0, 1)); result.withLock { $0 = "enqueued" } }
            catch { result.withLock { $0 = "\(error)" } }
        }.start()
        Thread.sleep(forTimeInterval: 0.05)
        s.channelFailed(0, reason: "link down")
        Thread.sleep(forTimeInterval: 0.1)
        #expect(result.current.contains("every data channel has failed"))
    }
}
