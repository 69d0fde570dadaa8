import FerryIO
import FerryWire
import Foundation
import Logging

/// The receiving half of the data path: takes chunks from every data channel, puts each
/// stream back in order, writes it to its local socket, and acknowledges what was written
/// (cumulatively, per stream, on the live channels in turn). The destination's: QEMU's
/// migration streams and the forward halves of two-way streams. The source's (created by
/// its ``SourceDataPath`` for two-way streams): their reverse halves.
///
/// QEMU 7.2 tells its channels apart by the order in which they connect (the first is the
/// main stream), so migration stream `i` is connected only after stream `i-1`, and only
/// once its first bytes are here (a multifd channel's QEMU reads its header at once,
/// blocking its main loop until it comes). A two-way stream's half is written to the
/// socket it was opened with, in no order with the others.
///
/// With two-way streams the destination also sends: ``reverse`` reads the reverse halves
/// from the same sockets and sends them on the same channels, whose acknowledgements this
/// path's receivers hand it.
///
/// Threads: a receiver per data channel, a writer per stream, one acknowledgement sender;
/// the session's thread adds channels, ends streams, waits for completion, reads the figures.
// Every `var` (the streams' too) is under `monitor`, but a stream's writer reads its own
// position (`nextSequence`, `writtenBytes`) unlocked: only it writes them. The rest is immutable.
public final class DestinationDataPath: @unchecked Sendable {
    public typealias Connector = @Sendable (UInt32) throws -> Socket

    /// Under `monitor`, like the rest of the path's state; its position (`nextSequence`,
    /// `writtenBytes`) is written only by its stream's writer.
    private final class StreamState {
        /// Its writer waits here: for the next chunk in order, the end, or its turn to connect.
        let ready: Monitor.Condition
        init(ready: Monitor.Condition) { self.ready = ready }
        var pending: [UInt64: ChunkBytes] = [:]
        var pendingOffsets: [UInt64: UInt64] = [:]
        var nextSequence: UInt64 = 0
        var writtenBytes: UInt64 = 0
        var end: StreamEndMessage?
        var connected = false
        var done = false
        /// A two-way stream's half: the socket it is written to (nil until opened; chunks
        /// may come before the control connection's `streamOpen` is handled).
        var socket: Socket?
        var twoWay = false
    }

    /// One lock over the state; each stream's writer, the acknowledgement sender and the
    /// waiter for completion are woken only for what concerns them.
    private let monitor = Monitor()
    private let ackNeeded: Monitor.Condition
    private let progress: Monitor.Condition
    /// QEMU's migration streams: 0..<streamCount, connected in order by `connector`.
    private let streamCount: Int
    private let connector: Connector
    /// Whether a chunk may come for a two-way stream before it is opened here (at the
    /// destination, where the source opens them; the source opens its reverse halves first).
    private let acceptsUnopened: Bool
    private let logger: Logger
    private let onFailure: @Sendable (TransportError) -> Void
    private var streams: [UInt32: StreamState] = [:]
    private var channels: [Int: FrameConnection] = [:]
    private var failure: TransportError?
    /// Delivered to QEMU and not yet acknowledged: since when, how many bytes, and whether
    /// the acknowledgement should go at once (a stream is complete, or enough bytes).
    private var ackDirty = false
    private var ackDirtySince = ContinuousClock.now
    private var unacknowledgedBytes = 0
    private var ackUrgent = false
    /// The acknowledgement thread waits for no timer (all acknowledged, nothing coming).
    private var ackAsleep = false
    private var stopped = false
    private var bufferedBytes = 0
    private var peakBuffered = 0
    /// When the last stream's last byte was written into QEMU (seconds since the epoch).
    private var completedAt: Double?
    /// Called once, from a writer's thread, when every stream is complete. Set before
    /// the first chunk arrives.
    public var onComplete: (@Sendable () -> Void)?
    private var receivedPayloadBytes: UInt64 = 0
    /// Payload bytes received per local address (the NIC a channel came in on), for metrics.
    private var receivedByAddress: [String: UInt64] = [:]
    private var channelAddresses: [Int: String] = [:]
    /// Where the writers waited (``DestinationWaits``).
    private var writerWaits = DestinationWaits()
    private var duplicateChunks = 0
    private var splicedChunks = 0
    private var acceptedChunks = 0
    /// Chunks land in buffers of the usual chunk size; a peer that sends larger chunks
    /// (up to the protocol's maximum) gets buffers of that size from a second pool.
    private let pool = BufferPool(bufferByteCount: ChunkPolicy.chunkByteCount,
                                  keep: ChunkPolicy.windowByteCount / ChunkPolicy.chunkByteCount + 16)
    private let largePool = BufferPool(bufferByteCount: ChunkPolicy.maximumChunkByteCount, keep: 8)
    /// Pipes for chunks the source spliced (`unchecked` frames): they are spliced on to
    /// QEMU without passing through Ferry's memory. nil where this host cannot splice.
    private let pipes: PipePool? = SourceDataPath.zeroCopyAvailable
        ? PipePool(pipeCapacity: ChunkPolicy.pipeByteCount, keep: ChunkPolicy.windowByteCount / ChunkPolicy.chunkByteCount + 16) : nil

    /// The cores for the channel and stream threads (nil: not pinned).
    private let cpus: CPUSet?

    /// The sending half for the reverse halves of two-way streams (nil: one-way only, as
    /// with a peer older than ``ProtocolVersion/twoWayStreams``).
    public let reverse: SourceDataPath?
    /// QEMU's migration streams are two-way and connected in order without waiting for
    /// their first bytes (postcopy; see the convenience initializer).
    private let eagerMigrationStreams: Bool
    /// Sees each chunk in memory (not a pipe's) once it is written to its socket, with its
    /// stream (postcopy's requested pages, for their latency). Set before the first chunk.
    public var writeObserver: (@Sendable (UInt32, UnsafeRawBufferPointer) -> Void)?

    /// `twoWay`: this destination's session may open two-way streams (protocol 3 on).
    /// `twoWayMigrationStreams` (postcopy): QEMU's migration streams carry bytes back too
    /// (the main stream QEMU's return path, its page requests first of all), so each is
    /// connected as soon as the one before it is, without waiting for its first bytes (the
    /// preempt channel sends none until postcopy begins, and QEMU 7.2 waits for it before
    /// it reads the main stream), and what QEMU writes into it goes back to the source.
    public convenience init(streamCount: Int, twoWay: Bool = false, twoWayMigrationStreams: Bool = false, cpus: CPUSet? = nil,
                            logger: Logger, connector: @escaping Connector, onFailure: @escaping @Sendable (TransportError) -> Void) {
        let reverse = twoWay || twoWayMigrationStreams
            ? SourceDataPath(scheduler: SendScheduler(windowByteCount: ChunkPolicy.reverseWindowByteCount),
                             acknowledgedByPeer: false, logger: logger, onEvent: { _ in }) : nil
        self.init(streamCount: streamCount, acceptsUnopened: twoWay, reverse: reverse, twoWayMigrationStreams: twoWayMigrationStreams,
                  cpus: cpus, logger: logger, connector: connector, onFailure: onFailure)
    }

    init(streamCount: Int, acceptsUnopened: Bool, reverse: SourceDataPath?, twoWayMigrationStreams: Bool = false, cpus: CPUSet?,
         logger: Logger, connector: @escaping Connector, onFailure: @escaping @Sendable (TransportError) -> Void) {
        self.cpus = cpus
        self.streamCount = streamCount
        self.connector = connector
        self.acceptsUnopened = acceptsUnopened
        self.reverse = reverse
        self.logger = logger
        self.onFailure = onFailure
        self.eagerMigrationStreams = twoWayMigrationStreams && reverse != nil
        let monitor = self.monitor
        self.ackNeeded = monitor.makeCondition()
        self.progress = monitor.makeCondition()
        // Every stream's state before any writer runs: a writer signals the next stream's.
        for i in 0..<streamCount {
            let state = StreamState(ready: monitor.makeCondition())
            state.twoWay = eagerMigrationStreams
            streams[UInt32(i)] = state
        }
        for i in 0..<streamCount {
            spawn("ferry-wr-\(i)", core: i) { [self] in writeLoop(UInt32(i)) }
        }
        spawn("ferry-acks") { [self] in ackLoop() }
    }

    /// The receiving half of a source's two-way streams: their reverse halves, each opened
    /// with its socket before the stream is announced.
    static func reverseHalves(cpus: CPUSet?, logger: Logger, onFailure: @escaping @Sendable (TransportError) -> Void) -> DestinationDataPath {
        DestinationDataPath(streamCount: 0, acceptsUnopened: false, reverse: nil, cpus: cpus, logger: logger,
                            connector: { _ in throw TransportError.aborted("no migration streams here") }, onFailure: onFailure)
    }

    /// Where the events of ``reverse`` go (the ends of reverse halves, its failure). Set
    /// before the first two-way stream is opened.
    public var onReverseEvent: (@Sendable (DataPathEvent) -> Void)? {
        get { reverse?.eventSink }
        set { reverse?.eventSink = newValue }
    }

    // MARK: Two-way streams

    /// A two-way stream is open: its forward half is written to `socket` (chunks that came
    /// before are written now), and at the destination its reverse half is read from the
    /// same socket and sent back (`priority` 1: ahead of the rest).
    public func openTwoWay(stream: UInt32, socket: Socket, priority: UInt8 = 0) throws(TransportError) {
        guard let reverse else { throw .protocolViolation("two-way stream \(stream) on a session of a protocol before \(ProtocolVersion.twoWayStreams)") }
        guard StreamID.isTwoWay(stream) else { throw .protocolViolation("stream \(stream) cannot be a two-way stream") }
        try openHalf(stream, socket: socket)
        let half = StreamID.reverse(stream)
        if priority > 0 { reverse.scheduler.setHighPriority(stream: half) }
        reverse.addStream(half, socket: socket, twoWay: true)
    }

    /// Starts writing `half` to `socket`.
    func openHalf(_ half: UInt32, socket: Socket) throws(TransportError) {
        let opened = monitor.withLock { () -> Bool in
            let state = streams[half] ?? StreamState(ready: monitor.makeCondition())
            guard state.socket == nil else { return false }
            state.socket = socket
            state.twoWay = true
            state.connected = true
            streams[half] = state
            state.ready.signal()
            return true
        }
        guard opened else { throw .protocolViolation("stream \(half) opened twice") }
        spawn("ferry-wr-\(half)") { [self] in writeLoop(half) }
    }

    // MARK: Channels

    /// Starts receiving on a bound data channel (and sending the reverse halves on it).
    public func addChannel(_ id: Int, connection: FrameConnection) {
        let local = connection.socket.localAddress ?? "?"
        monitor.withLock {
            channels[id] = connection
            channelAddresses[id] = local
        }
        // Its "interface" in logs: the peer it reaches (a destination does not name its NICs per channel).
        reverse?.addChannel(id, connection: connection, interface: connection.socket.peer)
        spawn("ferry-rx-\(id)", core: id) { [self] in receiveLoop(id, connection) }
    }

    /// A channel the source's ``SourceDataPath`` receives on: acknowledgements of the reverse
    /// halves go out on it too.
    func addAcknowledgementChannel(_ id: Int, connection: FrameConnection) {
        monitor.withLock { channels[id] = connection }
    }

    func removeChannel(_ id: Int) {
        monitor.withLock { channels[id] = nil }
    }

    /// Receives one frame on `connection` into this path's buffers.
    func receive(on connection: FrameConnection) throws -> FrameConnection.Received {
        try connection.receive(dataInto: pool, largerInto: largePool, pipes: pipes)
    }

    private func receiveLoop(_ id: Int, _ connection: FrameConnection) {
        while true {
            let received: FrameConnection.Received
            do {
                received = try receive(on: connection)
            } catch let error as WireError {
                fail(.protocolViolation("data channel \(id): \(error)"))
                return
            } catch let error as SecurityError {
                // A chunk that fails authentication (tampered, replayed, reordered) is an
                // attack, not a broken link: the migration stops and the VM stays on the source.
                fail(.protocolViolation("data channel \(id): \(error)"))
                return
            } catch {
                // A channel that breaks is the source's to handle: it sends the chunks
                // again on the channels that remain.
                monitor.withLock { channels[id] = nil }
                if !monitor.withLock({ stopped }) {
                    logger.info("data channel closed", metadata: ["channel": "\(id)", "reason": "\(error)"])
                }
                connection.shutdown()
                reverse?.channelLost(id, reason: "receive: \(error)")
                return
            }
            let header: DataChunkHeader, bytes: ChunkBytes
            switch received {
            case .data(let h, let buffer): (header, bytes) = (h, .memory(buffer))
            case .splicedData(let h, let pipe): (header, bytes) = (h, .pipe(pipe))
            case .frame(let frame) where frame.type == .ack && reverse != nil:
                guard let ack = try? AckMessage.decode(frame.payload) else {
                    fail(.protocolViolation("malformed ack on data channel \(id)"))
                    return
                }
                reverse!.acknowledge(ack)
                continue
            case .frame(let frame):
                fail(.protocolViolation("\(frame.type) frame on data channel \(id)"))
                return
            }
            do {
                try deliver(header, bytes, channel: id)
            } catch let error as TransportError {
                fail(error)
                return
            } catch {
                fail(.protocolViolation("data channel \(id): \(error)"))
                return
            }
        }
    }

    /// Takes a chunk that came on a data channel.
    func deliver(_ header: DataChunkHeader, _ buffer: ChunkBytes, channel: Int? = nil) throws {
        let size = buffer.count
        monitor.lock()
        defer { monitor.unlock() }
        if let channel, let address = channelAddresses[channel] { receivedByAddress[address, default: 0] += UInt64(size) }
        let stream: StreamState
        if let known = streams[header.stream] {
            stream = known
        } else if acceptsUnopened && StreamID.isTwoWay(header.stream) {
            // A two-way stream whose `streamOpen` is still on its way (the source's window
            // bounds what it may send meanwhile).
            stream = StreamState(ready: monitor.makeCondition())
            stream.twoWay = true
            streams[header.stream] = stream
        } else {
            throw TransportError.protocolViolation("chunk for stream \(header.stream), which is not open")
        }
        receivedPayloadBytes += UInt64(size)
        if header.sequence < stream.nextSequence || stream.pending[header.sequence] != nil {
            // Sent again after a channel failed, but it had arrived. The source sends again
            // only what it has not seen acknowledged: the acknowledgement that covered it was
            // lost (sent into a channel that died), so one goes again. Without it a source
            // whose whole window came back as duplicates would wait for it forever.
            duplicateChunks += 1
            if !ackDirty {
                ackDirty = true
                ackDirtySince = .now
                if ackAsleep { ackNeeded.signal() }
            }
            return
        }
        if let end = stream.end, header.sequence >= end.chunkCount {
            throw TransportError.protocolViolation("chunk \(header.sequence) beyond the end of stream \(header.stream)")
        }
        stream.pending[header.sequence] = buffer
        acceptedChunks += 1
        if case .pipe = buffer { splicedChunks += 1 }
        stream.pendingOffsets[header.sequence] = header.offset
        bufferedBytes += size
        peakBuffered = max(peakBuffered, bufferedBytes)
        if header.sequence == stream.nextSequence { stream.ready.signal() }
    }

    // MARK: Streams

    /// The peer says half `end.stream` has ended after `end.chunkCount` chunks.
    public func streamEnded(_ end: StreamEndMessage) throws {
        monitor.lock()
        defer { monitor.unlock() }
        if streams[end.stream] == nil && acceptsUnopened && StreamID.isTwoWay(end.stream) {
            // A forward half that ended before its first chunk or its opening came.
            let state = StreamState(ready: monitor.makeCondition())
            state.twoWay = true
            streams[end.stream] = state
        }
        guard let stream = streams[end.stream] else { throw TransportError.protocolViolation("end of unknown stream \(end.stream)") }
        guard stream.end == nil else { throw TransportError.protocolViolation("stream \(end.stream) ended twice") }
        stream.end = end
        stream.ready.signal()
    }

    /// Whether every chunk of a two-way stream's half has been written to its socket.
    public func isWritten(half: UInt32) -> Bool { monitor.withLock { streams[half]?.done ?? false } }

    private func writeLoop(_ id: UInt32) {
        let index = Int(id)
        let twoWay = monitor.withLock { streams[id]!.twoWay }
        // A two-way stream's socket is shared with the reader of its other half, and closes
        // when both have let go of it.
        var socket: Socket? = monitor.withLock { streams[id]!.socket }
        defer { if !twoWay { socket?.close() } }
        if eagerMigrationStreams && index < streamCount && socket == nil {
            // Postcopy: connected in order as soon as the stream before is, and read back.
            guard let connected = connectEagerly(id) else { return }
            socket = connected
        }
        while true {
            monitor.lock()
            // Wait for: our turn to connect and our first bytes, or the next chunk, or the end.
            var chunk: ChunkBytes?
            var offset: UInt64 = 0
            // Since when the next chunk was late while later ones of this stream were here.
            var lateSince: ContinuousClock.Instant?
            while failure == nil && !stopped {
                let s = streams[id]!
                if let end = s.end, s.nextSequence == end.chunkCount { break }
                if let bytes = s.pending[s.nextSequence], s.connected || index == 0 || streams[id - 1]!.connected {
                    chunk = bytes
                    offset = s.pendingOffsets[s.nextSequence] ?? 0
                    break
                }
                if lateSince == nil && s.pending[s.nextSequence] == nil && !s.pending.isEmpty { lateSince = .now }
                s.ready.wait()
            }
            if let lateSince {
                let waited = (ContinuousClock.now - lateSince).seconds * 1000
                writerWaits.lateChunkTotalMilliseconds += waited
                writerWaits.lateChunkLongestMilliseconds = max(writerWaits.lateChunkLongestMilliseconds, waited)
            }
            if failure != nil || stopped {
                monitor.unlock()
                return
            }
            let s = streams[id]!
            guard let bytes = chunk else {
                // Every chunk written: this stream (or half) is complete.
                let end = s.end!
                let ok = s.writtenBytes == end.byteCount
                let wasDone = migrationStreamsDone
                s.done = true
                let all = !wasDone && migrationStreamsDone
                if all { completedAt = Date().timeIntervalSince1970 }
                progress.broadcast()
                monitor.unlock()
                if all && ok { onComplete?() }
                if !ok {
                    fail(.protocolViolation("stream \(id) ended at \(s.writtenBytes) bytes, source says \(end.byteCount)"))
                }
                socket?.shutdownWrite()
                return
            }
            guard offset == s.writtenBytes else {
                monitor.unlock()
                fail(.protocolViolation("stream \(id) chunk \(s.nextSequence) at offset \(offset), expected \(s.writtenBytes)"))
                return
            }
            monitor.unlock()

            if socket == nil {
                do {
                    socket = try connector(id)
                } catch {
                    fail(.aborted("cannot connect stream \(id) to the destination QEMU: \(error)"))
                    return
                }
                monitor.withLock {
                    s.connected = true
                    if index + 1 < streamCount { streams[id + 1]!.ready.signal() }
                }
            }
            let size = bytes.count  // a pipe's count is 0 once drained
            let writeStarted = ContinuousClock.now
            defer {
                let waited = (ContinuousClock.now - writeStarted).seconds * 1000
                if waited >= 5 {
                    monitor.withLock {
                        writerWaits.qemuTotalMilliseconds += waited
                        writerWaits.qemuLongestMilliseconds = max(writerWaits.qemuLongestMilliseconds, waited)
                    }
                }
            }
            do {
                switch bytes {
                case .memory(let buffer):
                    try socket!.writeAll(buffer.bytes)
                    writeObserver?(id, buffer.bytes)
                case .pipe(let pipe): try pipe.pipe.drain(into: socket!.fd, more: false, peer: socket!.peer)
                }
            } catch {
                fail(.aborted("writing stream \(id) to the destination QEMU: \(error)"))
                return
            }
            monitor.withLock {
                s.pending[s.nextSequence] = nil
                s.pendingOffsets[s.nextSequence] = nil
                s.nextSequence += 1
                s.writtenBytes += UInt64(size)
                bufferedBytes -= size
                unacknowledgedBytes += size
                if !ackDirty {
                    ackDirty = true
                    ackDirtySince = .now
                    if ackAsleep { ackNeeded.signal() }
                }
                let streamDone = s.end.map { s.nextSequence == $0.chunkCount } ?? false
                if !ackUrgent && (unacknowledgedBytes >= Self.ackByteCount || streamDone) {
                    ackUrgent = true
                    ackNeeded.signal()
                }
            }
        }
    }

    /// Connects migration stream `id` once the one before it is connected, and starts
    /// sending what QEMU writes back into it (its reverse half; the main stream's, QEMU's
    /// return path, ahead of everything else). nil if the path failed or stopped meanwhile.
    private func connectEagerly(_ id: UInt32) -> Socket? {
        let index = Int(id)
        monitor.lock()
        while failure == nil && !stopped && index > 0 && !streams[id - 1]!.connected { streams[id]!.ready.wait() }
        let go = failure == nil && !stopped
        monitor.unlock()
        guard go, let reverse else { return nil }
        let socket: Socket
        do {
            socket = try connector(id)
        } catch {
            fail(.aborted("cannot connect stream \(id) to the destination QEMU: \(error)"))
            return nil
        }
        let half = StreamID.reverse(id)
        if id == 0 { reverse.scheduler.setHighPriority(stream: half) }
        reverse.addStream(half, socket: socket, twoWay: true)
        monitor.withLock {
            let s = streams[id]!
            s.connected = true
            s.socket = socket
            if index + 1 < streamCount { streams[id + 1]!.ready.signal() }
        }
        return socket
    }

    // MARK: Acknowledgements

    /// Sends the cumulative acknowledgement once 2 MiB (``ackByteCount``) went to QEMU, or
    /// 10 ms (``ackPeriod``) after the first byte not yet acknowledged, or at once when a
    /// stream is complete (the source waits for that one before it commits). Each frame
    /// goes on one live channel, in turn, falling through to the next if a send fails:
    /// acknowledgements are cumulative, so any channel will do and a lost one is made good
    /// by the next. Every frame wakes a thread at each end, so they are few: 2 MiB is a
    /// sixteenth of the source's window, so the window never waits for them, and at
    /// 2 Gbit/s this is about 120 frames a second instead of one per chunk.
    ///
    /// A channel whose NIC died silently still accepts sends here, so the last round before
    /// the data stops could vanish into it. Therefore, once nothing new has arrived for
    /// 50 ms, the latest acknowledgement goes out once more on every live channel.
    private func ackLoop() {
        var turn = 0
        var broadcastDone = true
        var lastSent = ContinuousClock.now
        while true {
            monitor.lock()
            while failure == nil && !stopped && !ackUrgent {
                let now = ContinuousClock.now
                if ackDirty {
                    if now >= ackDirtySince + Self.ackPeriod { break }
                    ackNeeded.wait(until: ackDirtySince + Self.ackPeriod)
                } else if !broadcastDone {
                    // Recently busy: look again every period until 50 ms without news.
                    if now >= lastSent + .milliseconds(50) { break }
                    ackNeeded.wait(timeout: Self.ackPeriod)
                } else {
                    ackAsleep = true
                    ackNeeded.wait()
                    ackAsleep = false
                }
            }
            if failure != nil || stopped {
                monitor.unlock()
                return
            }
            let idle = !ackDirty
            if idle && broadcastDone {
                monitor.unlock()
                continue
            }
            ackDirty = false
            ackUrgent = false
            unacknowledgedBytes = 0
            let ack = AckMessage(entries: streams.keys.sorted().map {
                AckMessage.Entry(stream: $0, nextSequence: streams[$0]!.nextSequence)
            })
            let targets = channels.keys.sorted().map { channels[$0]! }
            monitor.unlock()
            guard !targets.isEmpty else { continue }
            let frame = Frame(type: .ack, payload: ack.encoded())
            if idle {
                for channel in targets { try? channel.send(frame) }
                broadcastDone = true
                continue
            }
            broadcastDone = false
            lastSent = .now
            for k in 0..<targets.count {
                let channel = targets[(turn + k) % targets.count]
                if (try? channel.send(frame)) != nil { break }
            }
            turn += 1
        }
    }

    /// Bytes delivered to QEMU that make an acknowledgement due at once.
    static let ackByteCount = ChunkPolicy.windowByteCount / 16
    /// The longest a delivered byte waits for its acknowledgement.
    static let ackPeriod: Duration = .milliseconds(10)

    // MARK: Ending

    /// Waits until every stream has ended and been written to QEMU.
    public func waitUntilComplete(timeout: Duration) throws(TransportError) {
        monitor.lock()
        defer { monitor.unlock() }
        let deadline = Date().addingTimeInterval(timeout.seconds)
        while failure == nil && !migrationStreamsDone {
            if !progress.wait(timeout: .nanoseconds(Int64(deadline.timeIntervalSinceNow * 1e9))) {
                throw .timedOut("streams incomplete after \(Int(timeout.seconds)) s")
            }
        }
        if let failure { throw failure }
    }

    /// QEMU's migration streams are all written (lock held). Two-way streams end on their own.
    private var migrationStreamsDone: Bool { (0..<UInt32(streamCount)).allSatisfy { streams[$0]!.done } }

    public var isComplete: Bool { monitor.withLock { migrationStreamsDone } }
    /// When every stream was complete (seconds since the epoch), once they are.
    public var completionTime: Double? { monitor.withLock { completedAt } }

    /// Bytes of stream data written to QEMU so far.
    public var deliveredByteCount: UInt64 { monitor.withLock { streams.values.reduce(0) { $0 + $1.writtenBytes } } }
    public var receivedByteCount: UInt64 { monitor.withLock { receivedPayloadBytes } }
    /// Payload bytes received per local address of the data channels (duplicates included).
    public var receivedBytesByLocalAddress: [String: UInt64] { monitor.withLock { receivedByAddress } }
    /// Where the writers waited so far (``DestinationWaits``).
    public var waits: DestinationWaits { monitor.withLock { writerWaits } }

    /// The most bytes held in the reorder buffers at once.
    public var peakBufferedBytes: Int { monitor.withLock { peakBuffered } }
    public var duplicates: Int { monitor.withLock { duplicateChunks } }
    /// Chunks that went from a data channel to QEMU by splice, never copied.
    public var splicedChunkCount: Int { monitor.withLock { splicedChunks } }
    /// Chunks taken (duplicates not counted).
    public var chunkCount: Int { monitor.withLock { acceptedChunks } }

    public func fail(_ error: TransportError) {
        let first = monitor.withLock { () -> Bool in
            guard failure == nil && !stopped else { return false }
            failure = error
            wakeAll()
            return true
        }
        if first {
            reverse?.shutdown(reason: "\(error)")
            onFailure(error)
            stop()
        }
    }

    /// Stops every thread and closes the channels.
    public func stop() {
        let (conns, sockets) = monitor.withLock { () -> ([FrameConnection], [Socket]) in
            stopped = true
            wakeAll()
            return (Array(channels.values), streams.values.compactMap(\.socket))
        }
        reverse?.shutdown(reason: "stopped")
        conns.forEach { $0.shutdown() }
        sockets.forEach { $0.shutdown() }
    }

    /// Wakes every waiting thread (lock held): on failure and stop.
    private func wakeAll() {
        streams.values.forEach { $0.ready.broadcast() }
        ackNeeded.broadcast()
        progress.broadcast()
    }

    /// Starts a named thread, pinned to the core for `core` in ``cpus`` if given.
    private func spawn(_ name: String, core: Int? = nil, _ body: @escaping @Sendable () -> Void) {
        startThread(name, cpus: cpus, core: core, body)
    }
}
