import CFerryLinux
import FerryCompress
import FerryIO
import FerryWire
import Foundation
import Logging

/// What happened on the data path, for progress and the report.
public enum DataPathEvent: Sendable {
    case channelUp(channel: Int, interface: String)
    case channelFailed(channel: Int, interface: String, reason: String, requeuedChunks: Int)
    case streamEnded(StreamEndMessage)
    case failed(TransportError)
    /// The compression choice changed (`codec` nil: none).
    case compression(codec: String?, reason: String)
}

/// Byte counts of one data channel.
public struct ChannelStats: Sendable, Equatable {
    public var channel: Int
    public var interface: String
    public var payloadBytes: UInt64
    public var wireBytes: UInt64
    public var alive: Bool

    public init(channel: Int, interface: String, payloadBytes: UInt64, wireBytes: UInt64, alive: Bool) {
        self.channel = channel
        self.interface = interface
        self.payloadBytes = payloadBytes
        self.wireBytes = wireBytes
        self.alive = alive
    }
}

/// The sending half of the data path: reads local sockets into chunks and sends them over
/// the data channels (via the ``SendScheduler``), and takes the acknowledgements back. The
/// source's: QEMU's migration streams and the forward halves of two-way streams, and its
/// channels' receivers hand the reverse halves that come back to ``reverse``. A
/// destination's (its ``DestinationDataPath/reverse``): the reverse halves, sent on the
/// channels the destination receives on, which hand it their acknowledgements.
///
/// Threads: a reader per stream, a sender and (at the source) a receiver per channel, one
/// watchdog (at the source); the migration's thread adds channels and streams and reads
/// the figures.
// The channel and stream tables, `finished`, `threads` and `sink` are under `lock`; `cpus`
// and `stallTimeout` are set before the first thread starts; the rest is immutable.
public final class SourceDataPath: @unchecked Sendable {
    public let scheduler: SendScheduler
    /// nil: chunks always go raw (no compression at all, not even measured).
    public let compression: CompressionController?
    private let logger: Logger
    private var sink: (@Sendable (DataPathEvent) -> Void)?
    private let lock = Monitor()
    /// Whether this path reads its channels' acknowledgements itself and watches them for
    /// stalls (the source; a destination's receivers hand it the acknowledgements).
    private let acknowledgedByPeer: Bool
    /// Sees each chunk read into memory (not spliced), with its stream, before it is sent
    /// (postcopy's page requests, for their latency). Set before the streams are added.
    public var readObserver: (@Sendable (UInt32, UnsafeRawBufferPointer) -> Void)?

    /// The receiving half for two-way streams' reverse halves (the source's; nil: one-way).
    public let reverse: DestinationDataPath?
    private var channels: [Int: (FrameConnection, String, Bool)] = [:]
    private var streams: [UInt32: Socket] = [:]
    private var streamBytes: [UInt32: UInt64] = [:]
    private var finished = false
    private var threads: [Thread] = []
    /// Chunk buffers: the window's worth stays allocated and is reused.
    private let pool: BufferPool
    /// Zero-copy: chunks are spliced from QEMU's socket into pipes and from there into
    /// the data channels, never copied into Ferry's memory (nil: chunks are read).
    public let pipes: PipePool?

    /// `zeroCopy`: splice chunks through pipes instead of reading them (only for unsealed
    /// channels without compression, which never need the bytes; see ``zeroCopyAvailable``).
    /// `twoWay`: streams may be two-way (protocol 3 on). `acknowledgedByPeer` false: a
    /// destination's sender of reverse halves (see the type's notes).
    public init(scheduler: SendScheduler, compression: CompressionController? = nil, zeroCopy: Bool = false,
                twoWay: Bool = false, acknowledgedByPeer: Bool = true, logger: Logger,
                onEvent: @escaping @Sendable (DataPathEvent) -> Void) {
        precondition(!(zeroCopy && compression != nil), "zero-copy chunks cannot be compressed")
        self.scheduler = scheduler
        self.compression = compression
        self.logger = logger
        self.sink = onEvent
        self.acknowledgedByPeer = acknowledgedByPeer
        self.reverse = twoWay ? DestinationDataPath.reverseHalves(cpus: nil, logger: logger, onFailure: { [scheduler] error in
            scheduler.fail(error)
            onEvent(.failed(error))
        }) : nil
        self.pool = BufferPool(bufferByteCount: ChunkPolicy.chunkByteCount,
                               keep: ChunkPolicy.windowByteCount / ChunkPolicy.chunkByteCount + 16)
        self.pipes = zeroCopy ? PipePool(pipeCapacity: ChunkPolicy.pipeByteCount,
                                         keep: ChunkPolicy.windowByteCount / ChunkPolicy.chunkByteCount + 16) : nil
    }

    /// The cores for the channel and stream threads (nil: not pinned). Set before the
    /// first channel or stream is added (the threads it starts read it unlocked).
    public var cpus: CPUSet?

    /// Whether this host can splice chunks (pipes of the size needed, splice from a socket):
    /// probed once per process, for both ends of the data path.
    public static let zeroCopyAvailable = SplicePipe.isUsable(capacity: ChunkPolicy.pipeByteCount)

    /// Where this path's events go (a destination's reverse path gets its sink late).
    public var eventSink: (@Sendable (DataPathEvent) -> Void)? {
        get { lock.withLock { sink } }
        set { lock.withLock { sink = newValue } }
    }

    private func onEvent(_ event: DataPathEvent) {
        lock.withLock { sink }?(event)
    }

    // MARK: Channels

    /// Starts sending on a bound data channel.
    public func addChannel(_ id: Int, connection: FrameConnection, interface: String) {
        let startWatchdog = lock.withLock { () -> Bool in
            channels[id] = (connection, interface, true)
            defer { watchdogStarted = true }
            return !watchdogStarted && acknowledgedByPeer
        }
        scheduler.addChannel(id)
        reverse?.addAcknowledgementChannel(id, connection: connection)
        spawn("ferry-tx-\(id)", core: id) { [self] in sendLoop(id, connection, interface) }
        if acknowledgedByPeer {
            spawn("ferry-ack-\(id)", core: id) { [self] in ackLoop(id, connection, interface) }
        }
        if startWatchdog { spawn("ferry-watchdog") { [self] in watchdog() } }
        onEvent(.channelUp(channel: id, interface: interface))
    }

    /// An acknowledgement a destination's receiver took for this path.
    func acknowledge(_ ack: AckMessage) {
        for entry in ack.entries {
            scheduler.acknowledge(stream: entry.stream, nextSequence: entry.nextSequence)
        }
    }

    /// Channel `id` broke where its receiver saw it (a destination's): its chunks go again
    /// on the others.
    func channelLost(_ id: Int, reason: String) {
        guard let (connection, interface, _) = lock.withLock({ channels[id] }) else { return }
        channelDown(id, connection, interface, reason: reason)
    }

    /// A channel whose peer's kernel has acknowledged nothing for this long while data is
    /// outstanding is dead (a NIC or a path that died silently). Normal acknowledgements
    /// come within a round trip plus the NIC queue (tbf's 20 ms in the lab); TCP's own
    /// retransmission gives up far later. 1 s keeps a failover well inside 2 s. Set before
    /// the first channel is added (the watchdog reads it unlocked).
    public var stallTimeout: Duration = .milliseconds(1000)
    /// Under `lock`.
    private var watchdogStarted = false

    /// How often the compression advisor gets its figures: 0.5 s, the period its smoothing
    /// and pauses are tuned for.
    static let compressionPeriod: Duration = .milliseconds(500)

    private func watchdog() {
        var stalls = StallWatch(limitMilliseconds: UInt32(stallTimeout.milliseconds))
        let clock = ContinuousClock.now
        var nextCompressionTick = ContinuousClock.now + Self.compressionPeriod
        while scheduler.failureReason == nil && !lock.withLock({ finished }) {
            if let compression, ContinuousClock.now >= nextCompressionTick {
                nextCompressionTick = ContinuousClock.now + Self.compressionPeriod
                let stats = channelStats
                let backlog = scheduler.takeBacklog()
                let change = compression.tick(guestBytes: stats.reduce(0) { $0 + $1.payloadBytes },
                                              wireBytes: stats.reduce(0) { $0 + $1.wireBytes }, backlog: backlog)
                if logger.logLevel <= .debug {
                    let d = compression.currentDecision
                    logger.debug("compression period", metadata: ["backlog-ms": "\(backlog.milliseconds)", "codec": "\(d.codec?.description ?? "none")",
                                                                   "trials": "\(d.trials.map { $0.description })/\(d.trialPeriod)", "reason": "\(d.reason)"])
                }
                if let change {
                    onEvent(.compression(codec: change.codec?.description, reason: change.reason))
                }
            }
            let live = lock.withLock { channels.filter { $0.value.2 }.map { ($0.key, $0.value.0, $0.value.1) } }
            let now = (ContinuousClock.now - clock).seconds
            for (id, connection, interface) in live {
                guard let p = connection.socket.tcpProgress() else { continue }
                if let age = stalls.check(channel: id, unackedSegments: p.unackedSegments,
                                          millisecondsSinceLastAck: p.millisecondsSinceLastAck, now: now) {
                    stalls.forget(channel: id)
                    channelDown(id, connection, interface, reason: "no TCP acknowledgement for \(age) ms")
                }
            }
            scheduler.checkNoChannelGrace()
            if let failure = scheduler.failureReason {
                onEvent(.failed(failure))
                return
            }
            usleep(100_000)
        }
    }

    /// Ends every live channel on `interface` (its NIC lost carrier or its address).
    /// Returns how many were ended.
    @discardableResult
    public func failChannels(onInterface interface: String, reason: String) -> Int {
        let victims = lock.withLock { channels.filter { $0.value.2 && $0.value.1 == interface }.map { ($0.key, $0.value.0) } }
        for (id, connection) in victims { channelDown(id, connection, interface, reason: reason) }
        return victims.count
    }

    /// Live channels per interface.
    public var liveChannelsByInterface: [String: Int] {
        lock.withLock {
            var out: [String: Int] = [:]
            for (_, value) in channels where value.2 { out[value.1, default: 0] += 1 }
            return out
        }
    }

    private func sendLoop(_ id: Int, _ connection: FrameConnection, _ interface: String) {
        let compressor = compression.map { _ in ChunkCompressor() }
        // The pipe a spliced chunk passes through on its way out (its own pipe keeps it).
        var scratch: SplicePipe?
        while let chunk = scheduler.next(for: id) {
            do {
                if let pipe = chunk.pipe {
                    if scratch == nil { scratch = try SplicePipe(capacity: ChunkPolicy.pipeByteCount) }
                    try connection.sendSpliced(chunk.header, pipe, via: scratch!)
                    continue
                }
                guard let buffer = chunk.buffer else { continue }
                let compressed = compression.flatMap { compressor!.compress(buffer.bytes, with: $0) }
                try connection.sendData(chunk.header, bytes: buffer.bytes, compressed: compressed)
            } catch {
                channelDown(id, connection, interface, reason: "send: \(error)")
                return
            }
        }
    }

    private func ackLoop(_ id: Int, _ connection: FrameConnection, _ interface: String) {
        while true {
            let frame: Frame
            do {
                // Waiting in poll, not in the read: a thread blocked in a TCP read shares the
                // socket's wait queue with the sender blocked for buffer space, and is woken
                // (for nothing) each time space frees up; poll's wait is woken only for input.
                _ = connection.socket.waitReadable(timeout: nil)
                if let reverse {
                    switch try reverse.receive(on: connection) {
                    case .frame(let f): frame = f
                    case .data(let header, let buffer):
                        try reverse.deliver(header, .memory(buffer))
                        continue
                    case .splicedData(let header, let pipe):
                        try reverse.deliver(header, .pipe(pipe))
                        continue
                    }
                } else {
                    frame = try connection.receive()
                }
            } catch let error as TransportError {
                reverse?.fail(error)
                return
            } catch let error as SecurityError {
                // Not a broken link but a forged or replayed frame: someone is on the path.
                // The migration stops; the VM stays on the source.
                let failure = TransportError.protocolViolation("data channel \(id) on \(interface): \(error)")
                scheduler.fail(failure)
                onEvent(.failed(failure))
                return
            } catch {
                channelDown(id, connection, interface, reason: "receive: \(error)")
                return
            }
            switch frame.type {
            case .ack:
                guard let ack = try? AckMessage.decode(frame.payload) else {
                    channelDown(id, connection, interface, reason: "malformed ack")
                    return
                }
                acknowledge(ack)
            case .error:
                let message = (try? ControlCoding.decode(ErrorMessage.self, from: frame))?.description ?? "error frame"
                channelDown(id, connection, interface, reason: "destination: \(message)")
                return
            default:
                channelDown(id, connection, interface, reason: "unexpected \(frame.type) frame")
                return
            }
        }
    }

    private func channelDown(_ id: Int, _ connection: FrameConnection, _ interface: String, reason: String) {
        let first = lock.withLock { () -> Bool in
            guard !finished, let entry = channels[id], entry.2 else { return false }
            channels[id]!.2 = false
            return true
        }
        connection.shutdown()
        guard first else { return }
        reverse?.removeChannel(id)
        let requeued = scheduler.channelFailed(id, reason: reason)
        if scheduler.failureReason == nil {
            logger.warning("data channel failed; its chunks go again on the others",
                           metadata: ["channel": "\(id)", "interface": "\(interface)", "reason": "\(reason)", "requeued": "\(requeued)"])
        }
        onEvent(.channelFailed(channel: id, interface: interface, reason: reason, requeuedChunks: requeued))
        if let failure = scheduler.failureReason { onEvent(.failed(failure)) }
    }

    /// Per-channel byte counts.
    public var channelStats: [ChannelStats] {
        lock.withLock {
            channels.keys.sorted().map { id in
                let (conn, nic, alive) = channels[id]!
                let c = conn.counters.current
                return ChannelStats(channel: id, interface: nic, payloadBytes: c.sentPayloadBytes, wireBytes: c.sentBytes, alive: alive)
            }
        }
    }

    // MARK: Streams

    /// Starts reading stream (or half) `id` from `socket` into chunks. `twoWay`: the socket
    /// also carries the other half, so reaching its end closes only this direction.
    public func addStream(_ id: UInt32, socket: Socket, twoWay: Bool = false) {
        lock.withLock { streams[id] = socket }
        spawn("ferry-rd-\(id)", core: twoWay ? nil : Int(id)) { [self] in readLoop(id, socket, twoWay: twoWay) }
    }

    /// Opens two-way stream `stream` on `socket` (the source's end: a local client that
    /// connected): its reverse half is written to the socket as it comes back, then its
    /// forward half is read. Announce it (`streamOpen`) after this. `priority` 1: its
    /// chunks go ahead of every other stream's.
    public func openTwoWay(stream: UInt32, socket: Socket, priority: UInt8 = 0) throws(TransportError) {
        guard let reverse else { throw .aborted("two-way streams need protocol \(ProtocolVersion.twoWayStreams) on both hosts") }
        guard StreamID.isTwoWay(stream) else { throw .aborted("stream \(stream) cannot be a two-way stream") }
        if priority > 0 { scheduler.setHighPriority(stream: stream) }
        try reverse.openHalf(StreamID.reverse(stream), socket: socket)
        addStream(stream, socket: socket, twoWay: true)
    }

    /// One of QEMU's migration streams that carries bytes both ways (postcopy: the main
    /// stream brings the destination's page requests back, QEMU's return path): what comes
    /// back is written to `socket`, and what QEMU writes is read from it. `priority` 1: its
    /// chunks go ahead of every other stream's (the preempt channel's requested pages).
    public func addTwoWayMigrationStream(_ id: UInt32, socket: Socket, priority: UInt8 = 0) throws(TransportError) {
        guard let reverse else { throw .aborted("two-way streams need protocol \(ProtocolVersion.twoWayStreams) on both hosts") }
        guard !StreamID.isTwoWay(id) && !StreamID.isReverse(id) else { throw .aborted("stream \(id) is not one of QEMU's migration streams") }
        if priority > 0 { scheduler.setHighPriority(stream: id) }
        try reverse.openHalf(StreamID.reverse(id), socket: socket)
        addStream(id, socket: socket, twoWay: true)
    }

    private func readLoop(_ id: UInt32, _ socket: Socket, twoWay: Bool) {
        var sequence: UInt64 = 0
        var offset: UInt64 = 0
        var ended = false
        while !ended {
            let chunk: Chunk
            do {
                let header = DataChunkHeader(stream: id, sequence: sequence, offset: offset)
                if let pipes, let pipe = try? pipes.take() {
                    ended = try splice(from: socket, into: pipe)
                    if pipe.count == 0 { break }
                    chunk = Chunk(header: header, pipe: pipe)
                } else {
                    let buffer = pool.take()
                    let n = try socket.read(into: buffer.space)
                    if n == 0 { break }
                    buffer.count = n
                    readObserver?(id, buffer.bytes)
                    chunk = Chunk(header: header, buffer: buffer)
                }
            } catch {
                scheduler.fail(.aborted("reading QEMU stream \(id): \(error)"))
                onEvent(.failed(.aborted("reading QEMU stream \(id): \(error)")))
                return
            }
            let n = chunk.byteCount
            do {
                try scheduler.enqueue(chunk)
            } catch {
                return
            }
            sequence += 1
            offset += UInt64(n)
            lock.withLock { streamBytes[id] = offset }
        }
        if twoWay { socket.shutdownRead() } else { socket.close() }
        onEvent(.streamEnded(StreamEndMessage(stream: id, chunkCount: sequence, byteCount: offset)))
    }

    /// Splices one chunk from QEMU's socket into `pipe`: waits for the first bytes, then
    /// takes whatever more is there at once, up to the chunk size (a read would take the
    /// same). Returns true at the end of the stream.
    private func splice(from socket: Socket, into pipe: PipeChunk) throws(SocketError) -> Bool {
        let limit = ChunkPolicy.chunkByteCount
        guard let first = try pipe.pipe.fill(from: socket.fd, max: limit, nonblocking: false, peer: socket.peer), first > 0 else {
            return true
        }
        while pipe.count < limit, let n = try pipe.pipe.fill(from: socket.fd, max: limit - pipe.count, nonblocking: true, peer: socket.peer) {
            if n == 0 { return true }
        }
        return false
    }

    /// Chunk buffers allocated now (in flight or kept for reuse): bounded by the window.
    public var allocatedBufferCount: Int { pool.allocatedCount }

    /// Shuts stream `id`'s local socket both ways (a disk copy's NBD client, after a
    /// failure): whatever waits on it, QEMU's requests in flight among them, ends at once.
    public func shutdownStream(_ id: UInt32) {
        lock.withLock { streams[id] }?.shutdown()
    }

    /// Bytes read so far from stream (or half) `id`.
    public func byteCount(ofStream id: UInt32) -> UInt64 { lock.withLock { streamBytes[id] ?? 0 } }

    /// Bytes read from QEMU so far, all streams.
    public var streamByteCount: UInt64 { lock.withLock { streamBytes.values.reduce(0, +) } }

    // MARK: Lifetime

    /// Stops every thread: sockets are shut, the scheduler fails its waiters.
    public func shutdown(reason: String) {
        scheduler.fail(.aborted(reason))
        reverse?.stop()
        let (conns, socks) = lock.withLock { (channels.values.map(\.0), Array(streams.values)) }
        conns.forEach { $0.shutdown() }
        socks.forEach { $0.shutdown() }
    }

    /// Everything is acknowledged: channels closing from now on are not failures.
    public func markFinished() {
        lock.withLock { finished = true }
    }

    /// Closes the data channels after a finished migration.
    public func closeChannels() {
        let conns = lock.withLock { () -> [FrameConnection] in
            finished = true
            return channels.values.map(\.0)
        }
        conns.forEach { $0.shutdown() }
    }

    /// Starts a named thread, pinned to the core for `core` in ``cpus`` if given.
    private func spawn(_ name: String, core: Int? = nil, _ body: @escaping @Sendable () -> Void) {
        let thread = startThread(name, cpus: cpus, core: core, body)
        lock.withLock { threads.append(thread) }
    }
}
