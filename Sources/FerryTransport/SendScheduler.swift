import FerryIO
import FerryWire
import Foundation

/// Tunables of the data path, each with the reason for its value.
public enum ChunkPolicy {
    /// Bytes read from QEMU per chunk at most. 512 KiB is 4 ms of a 1 Gbit/s NIC: small
    /// enough that striping keeps every channel busy and a retransmission after a failed
    /// NIC is cheap, large enough that the 40 bytes of framing are nothing and the
    /// wake-ups per GiB (each chunk wakes a sender at the source and a receiver at the
    /// destination) stay near 2,000. Going from 256 KiB to 512 KiB cut the destination's
    /// CPU per GiB by about a fifth (docs/ARCHITECTURE.md, "Wake-ups").
    public static let chunkByteCount = 512 << 10
    /// The largest chunk a receiver accepts (a peer may choose larger chunks, up to this).
    public static let maximumChunkByteCount = 1 << 20
    /// Bytes read from QEMU but not yet acknowledged by the destination, at most. This is
    /// what bounds Ferry's memory on both sides, whatever the VM's size. 32 MiB covers the
    /// bandwidth-delay product of 2 x 10 Gbit/s at 10 ms (25 MiB) with room to spare, and
    /// is what a failover may have to send again.
    public static let windowByteCount = 32 << 20
    /// Bytes each stream may have outstanding even when the shared window is full. QEMU's
    /// streams depend on one another: the destination's multifd threads stop at each sync
    /// point until the main stream brings the matching flag, so a window filled with
    /// multifd data that the destination QEMU cannot take yet would starve the main stream
    /// and deadlock the migration. With a reserve per stream every stream can always move.
    /// 2 MiB is 8 chunks, enough for the main stream's sync flags and device state to
    /// flow at a useful rate; it adds at most 2 MiB per stream to the memory bound.
    public static let streamReserveByteCount = 2 << 20
    /// A pipe for a zero-copy chunk is this many times the chunk's size: a pipe holds a
    /// page reference per piece of socket buffer, and over a path that delivers one TCP
    /// segment per piece (1448 bytes at MTU 1500) a 512 KiB chunk takes 363 of them.
    /// 2 x 512 KiB = 1 MiB gives 256 slots, and is the most an unprivileged process (or
    /// root without CAP_SYS_RESOURCE) may ask for (/proc/sys/fs/pipe-max-size). Only
    /// slots are reserved, not memory. A chunk that does not fit is copied instead; at the
    /// destination the receiver waits until a chunk's body is all queued, and GRO (or
    /// the lab's veth) hands TCP's data over in larger pieces, so in practice every chunk
    /// fits (the destination logs how many were spliced when the VM is loaded).
    public static let pipeSlotMargin = 2
    /// The send buffer of the unix sockets between Ferry and QEMU (QEMU's end at the
    /// source, Ferry's at the destination). The writer on a full unix socket wakes when
    /// three quarters have drained, so this is about the bytes moved per wake-up: 4 MiB
    /// makes that 3 MiB instead of 150 KiB with the kernel's default of 208 KiB. Where the
    /// process may not pass net.core.wmem_max (not root), the socket gets that maximum.
    public static let qemuSocketBufferByteCount = 4 << 20
    public static let pipeByteCount = chunkByteCount * pipeSlotMargin
    /// The window of a destination's reverse halves (a disk's replies, QEMU's return
    /// path): their traffic is small, and this bounds what the destination holds for them.
    public static let reverseWindowByteCount = 8 << 20
}

/// A piece of a QEMU stream on its way to the destination.
public struct Chunk: Sendable {
    public var header: DataChunkHeader
    /// The bytes, in memory or (zero-copy) in a pipe; both nil once the chunk was
    /// acknowledged while it waited for a resend.
    public var buffer: ChunkBuffer?
    public var pipe: PipeChunk?
    public let byteCount: Int
    /// Memory the chunk holds (its buffer's capacity, or for a pipe the largest chunk it
    /// takes): what the window counts, so that many small reads cannot hold much memory.
    public let memoryCost: Int
    public init(header: DataChunkHeader, buffer: ChunkBuffer) {
        self.header = header
        self.buffer = buffer
        self.byteCount = buffer.count
        self.memoryCost = buffer.capacity
    }

    public init(header: DataChunkHeader, pipe: PipeChunk, memoryCost: Int = ChunkPolicy.chunkByteCount) {
        self.header = header
        self.pipe = pipe
        self.byteCount = pipe.count
        self.memoryCost = memoryCost
    }

    /// Whether the chunk still holds its bytes.
    public var isHeld: Bool { buffer != nil || pipe != nil }

    /// Lets go of the bytes.
    public mutating func drop() {
        buffer = nil
        pipe = nil
    }
}

/// Why the data path stopped.
public enum TransportError: Error, CustomStringConvertible, Sendable {
    case noChannelsLeft(String)
    case aborted(String)
    case protocolViolation(String)
    case timedOut(String)

    public var description: String {
        switch self {
        case .noChannelsLeft(let why): return "every data channel has failed (last: \(why))"
        case .aborted(let why): return why
        case .protocolViolation(let why): return "protocol violation: \(why)"
        case .timedOut(let why): return why
        }
    }
}

/// The source's striping scheduler: chunks wait here until a data channel takes them, and
/// stay here after sending until the destination acknowledges them.
///
/// Every channel's sender pulls the next chunk when its socket can take more, so a faster
/// NIC pulls more chunks: the share of each channel follows its rate without measuring it.
/// A failed channel's unacknowledged chunks go back to the front of the queue and are
/// sent again on the channels that remain.
///
/// Shared by the stream readers (producers), the channels' senders and acknowledgement
/// readers, the watchdog, and the migration's thread, which waits for the last acknowledgement.
// Every `var` is under `monitor` (the state machine is one value under one lock); the
// conditions and limits are immutable.
public final class SendScheduler: @unchecked Sendable {
    private struct InFlight {
        var chunk: Chunk
        var channel: Int
    }

    /// One lock over the state; senders, producers and the waiter for the last
    /// acknowledgement each wait on a condition of their own and are woken only for what
    /// concerns them (a queued chunk wakes one sender, not every thread).
    private let monitor = Monitor()
    private let senders: Monitor.Condition
    private let producers: Monitor.Condition
    private let drained: Monitor.Condition
    private var windowByteCount: Int
    private var queue: [Chunk] = []
    private var queueHead = 0
    /// Chunks of high-priority streams: taken before anything in `queue` (few and small:
    /// a page request, a disk's replies), and put back first after a failover.
    private var priorityQueue: [Chunk] = []
    private var priorityStreams = Set<UInt32>()
    private var inFlight: [UInt32: [UInt64: InFlight]] = [:]
    private var acked: [UInt32: UInt64] = [:]
    /// Memory held by chunks read and not yet acknowledged (buffer capacities).
    private var outstandingBytes = 0
    /// The same, per stream (see `ChunkPolicy.streamReserveByteCount`).
    private var streamOutstanding: [UInt32: Int] = [:]
    private let streamReserveByteCount: Int
    private var liveChannels = Set<Int>()
    private var everHadChannel = false
    private var failure: TransportError?
    private var closedForInput = false
    private var lastChannelError = ""
    /// Chunks sent again after a channel failed, and their bytes.
    private var retransmittedChunkCount = 0
    private var retransmittedByteCount: UInt64 = 0
    private var peakOutstanding = 0
    /// How long the transfer may go on with no channel at all, waiting for a NIC to come
    /// back, before it fails. Zero: fail as soon as the last channel is gone.
    /// How long the transport may have no channel before it fails (nil: never; under the
    /// monitor).
    private var noChannelGrace: Duration?
    private var noChannelsSince: ContinuousClock.Instant?
    /// Time the channels were behind QEMU: chunks waited for a channel, or QEMU's reader
    /// waited for the window (the channels' socket buffers hold the window's worth, so on
    /// a saturated link the queue itself can stay empty while the reader waits). How much
    /// of the time the channels, not QEMU, were the bottleneck: for the compression advisor.
    private var backlogSince: ContinuousClock.Instant?
    private var backlog: Duration = .zero
    private var waitingProducers = 0
    /// Token bucket for the bandwidth limit (nil: unlimited), shared by all channels.
    private var rateBytesPerSecond: UInt64?
    private var tokens = 0.0
    private var tokensAt = ContinuousClock.now

    public init(windowByteCount: Int = ChunkPolicy.windowByteCount,
                streamReserveByteCount: Int = ChunkPolicy.streamReserveByteCount, noChannelGrace: Duration = .zero) {
        self.windowByteCount = windowByteCount
        self.streamReserveByteCount = streamReserveByteCount
        self.noChannelGrace = noChannelGrace
        senders = monitor.makeCondition()
        producers = monitor.makeCondition()
        drained = monitor.makeCondition()
    }

    /// Limits the rate at which chunks leave, all channels together (nil: no limit).
    public func setRateLimit(bytesPerSecond: UInt64?) {
        monitor.withLock {
            rateBytesPerSecond = bytesPerSecond
            tokens = 0
            tokensAt = ContinuousClock.now
            senders.broadcast()
        }
    }

    public var rateLimit: UInt64? { monitor.withLock { rateBytesPerSecond } }

    /// Sets the window: the most chunk memory read from QEMU and not yet acknowledged (at
    /// least two chunks). A smaller one takes effect as acknowledgements drain the excess.
    public func setWindow(byteCount: Int) {
        monitor.withLock {
            windowByteCount = max(2 * ChunkPolicy.maximumChunkByteCount, byteCount)
            producers.broadcast()
        }
    }

    public var window: Int { monitor.withLock { windowByteCount } }

    /// Waits (lock held, released while waiting) until the bucket holds `bytes`, then takes
    /// them. The bucket holds at most 10 ms of the rate (at least one chunk), so a pause
    /// does not turn into a burst. Returns false if the transport failed meanwhile.
    private func takeTokens(_ bytes: Int) -> Bool {
        while let rate = rateBytesPerSecond, failure == nil {
            let now = ContinuousClock.now
            let depth = max(Double(rate) / 100, Double(ChunkPolicy.maximumChunkByteCount))
            tokens = min(depth, tokens + Double(rate) * (now - tokensAt).seconds)
            tokensAt = now
            if tokens >= Double(bytes) {
                tokens -= Double(bytes)
                return true
            }
            let wait = (Double(bytes) - tokens) / Double(rate)
            senders.wait(timeout: .nanoseconds(Int64(wait * 1e9)))
        }
        return failure == nil
    }

    /// Chunks of `stream` (a half's number) go ahead of every other stream's from now on.
    public func setHighPriority(stream: UInt32) {
        monitor.withLock { _ = priorityStreams.insert(stream) }
    }

    /// Whether a chunk waits to be sent (lock held).
    private var hasQueued: Bool { !priorityQueue.isEmpty || queueHead < queue.count }

    // MARK: Producers (one reader thread per QEMU stream)

    /// Queues a chunk, waiting while the window is full and the chunk's stream has used its
    /// reserve. Throws once the transport has failed.
    public func enqueue(_ chunk: Chunk) throws(TransportError) {
        monitor.lock()
        defer { monitor.unlock() }
        let stream = chunk.header.stream
        waitingProducers += 1
        notePressure()
        while failure == nil && outstandingBytes + chunk.memoryCost > windowByteCount && outstandingBytes > 0
                && streamOutstanding[stream, default: 0] + chunk.memoryCost > streamReserveByteCount {
            producers.wait()
        }
        waitingProducers -= 1
        if let failure { throw failure }
        if priorityStreams.contains(stream) { priorityQueue.append(chunk) } else { queue.append(chunk) }
        notePressure()
        outstandingBytes += chunk.memoryCost
        streamOutstanding[stream, default: 0] += chunk.memoryCost
        peakOutstanding = max(peakOutstanding, outstandingBytes)
        senders.signal()
    }

    // MARK: Channels

    public func addChannel(_ id: Int) {
        monitor.lock()
        liveChannels.insert(id)
        noChannelsSince = nil
        everHadChannel = true
        monitor.unlock()
    }

    public var liveChannelCount: Int { monitor.withLock { liveChannels.count } }

    /// Chunks sent on `channel` and not yet acknowledged.
    public func inFlightCount(onChannel channel: Int) -> Int {
        monitor.withLock { inFlight.values.reduce(0) { $0 + $1.values.filter { $0.channel == channel }.count } }
    }

    /// The next chunk for `channel` to send, recorded as in flight on it. Blocks until one
    /// is queued; nil when the transport is finished or failed, or the channel was removed.
    public func next(for channel: Int) -> Chunk? {
        monitor.lock()
        defer { monitor.unlock() }
        while true {
            if failure != nil || !liveChannels.contains(channel) { return nil }
            if !priorityQueue.isEmpty {
                if rateBytesPerSecond != nil {
                    guard takeTokens(priorityQueue[0].byteCount) else { return nil }
                    guard !priorityQueue.isEmpty, liveChannels.contains(channel) else { continue }
                }
                let chunk = priorityQueue.removeFirst()
                notePressure()
                if let taken = take(chunk, for: channel) { return taken }
                continue
            }
            if queueHead < queue.count {
                if rateBytesPerSecond != nil {
                    guard takeTokens(queue[queueHead].byteCount) else { return nil }
                    guard queueHead < queue.count, liveChannels.contains(channel) else { continue }
                }
                let chunk = queue[queueHead]
                // The queue's slot lets go of the bytes at once (the in-flight entry holds
                // them now); dequeued slots are dropped in batches.
                queue[queueHead].drop()
                queueHead += 1
                if queueHead >= 64 && queueHead * 2 > queue.count {
                    queue.removeFirst(queueHead)
                    queueHead = 0
                }
                notePressure()
                if let taken = take(chunk, for: channel) { return taken }
                continue
            }
            if closedForInput && inFlight.values.allSatisfy(\.isEmpty) { return nil }
            senders.wait()
        }
    }

    /// Records a dequeued chunk as in flight on `channel` (lock held); nil for a chunk that
    /// was acknowledged while it waited for a resend (dropped).
    private func take(_ chunk: Chunk, for channel: Int) -> Chunk? {
        if !chunk.isHeld || chunk.header.sequence < acked[chunk.header.stream, default: 0] { return nil }
        inFlight[chunk.header.stream, default: [:]][chunk.header.sequence] = InFlight(chunk: chunk, channel: channel)
        // More queued: pass the wake-up on to another sender.
        if hasQueued { senders.signal() }
        return chunk
    }

    /// A cumulative acknowledgement: every chunk of `stream` below `nextSequence` arrived.
    public func acknowledge(stream: UInt32, nextSequence: UInt64) {
        monitor.lock()
        defer { monitor.unlock() }
        let from = acked[stream, default: 0]
        guard nextSequence > from else { return }
        acked[stream] = nextSequence
        if var chunks = inFlight[stream] {
            if UInt64(chunks.count) < nextSequence - from {
                for (seq, entry) in chunks where seq < nextSequence {
                    release(entry.chunk)
                    chunks[seq] = nil
                }
            } else {
                for seq in from..<nextSequence {
                    if let entry = chunks.removeValue(forKey: seq) { release(entry.chunk) }
                }
            }
            inFlight[stream] = chunks
        }
        // Chunks still queued for a resend but now acknowledged are freed when dequeued;
        // count their bytes out now so the window opens.
        for i in queueHead..<queue.count where queue[i].header.stream == stream && queue[i].header.sequence < nextSequence {
            if queue[i].isHeld {
                release(queue[i])
                queue[i].drop()
            }
        }
        for i in priorityQueue.indices where priorityQueue[i].header.stream == stream && priorityQueue[i].header.sequence < nextSequence {
            if priorityQueue[i].isHeld {
                release(priorityQueue[i])
                priorityQueue[i].drop()
            }
        }
        if waitingProducers > 0 { producers.broadcast() }
        if outstandingBytes == 0 {
            drained.broadcast()
            // Senders waiting at the end for a possible resend may go.
            if closedForInput { senders.broadcast() }
        }
    }

    /// Counts an acknowledged chunk's memory out of the window (lock held).
    private func release(_ chunk: Chunk) {
        outstandingBytes -= chunk.memoryCost
        streamOutstanding[chunk.header.stream, default: 0] -= chunk.memoryCost
    }

    /// `channel` is gone: its unacknowledged chunks go to the front of the queue.
    /// Returns the number of chunks requeued. Fails the transport if no channel is left.
    @discardableResult
    public func channelFailed(_ channel: Int, reason: String) -> Int {
        monitor.lock()
        defer { monitor.unlock() }
        guard liveChannels.remove(channel) != nil else { return 0 }
        lastChannelError = reason
        var requeue: [Chunk] = []
        for (stream, chunks) in inFlight {
            for (seq, entry) in chunks where entry.channel == channel {
                requeue.append(entry.chunk)
                inFlight[stream]![seq] = nil
            }
        }
        requeue.sort { ($0.header.sequence, $0.header.stream) < ($1.header.sequence, $1.header.stream) }
        let urgent = requeue.filter { priorityStreams.contains($0.header.stream) }
        if !urgent.isEmpty {
            priorityQueue.insert(contentsOf: urgent, at: 0)
            requeue.removeAll { priorityStreams.contains($0.header.stream) }
        }
        if !requeue.isEmpty {
            queue.replaceSubrange(queueHead..<queueHead, with: requeue)
        }
        let requeued = urgent.count + requeue.count
        if requeued > 0 {
            notePressure()
            retransmittedChunkCount += requeued
            retransmittedByteCount += (urgent + requeue).reduce(0) { $0 + UInt64($1.byteCount) }
        }
        if liveChannels.isEmpty && failure == nil {
            if noChannelGrace == Duration.zero {
                failure = .noChannelsLeft(reason)
            } else {
                noChannelsSince = ContinuousClock.now
            }
        }
        // Requeued chunks, a removed channel's sender, perhaps a failure: wake everyone.
        wakeAll()
        return requeued
    }

    // MARK: Ending

    /// No more chunks will be queued (every QEMU stream has ended).
    public func closeInput() {
        monitor.lock()
        closedForInput = true
        senders.broadcast()
        monitor.unlock()
    }

    /// Waits until every queued chunk is acknowledged. Throws on failure or timeout.
    public func waitUntilAllAcknowledged(timeout: Duration) throws(TransportError) {
        monitor.lock()
        defer { monitor.unlock() }
        let deadline = Date().addingTimeInterval(timeout.seconds)
        while failure == nil && outstandingBytes > 0 {
            if !drained.wait(timeout: .nanoseconds(Int64(deadline.timeIntervalSinceNow * 1e9))) {
                throw .timedOut("the destination did not acknowledge the last \(outstandingBytes) bytes in \(Int(timeout.seconds)) s")
            }
        }
        if let failure { throw failure }
    }

    /// From now on the transport waits for a channel however long it has none (postcopy:
    /// giving up would leave the VM's two QEMUs paused).
    public func waitForChannelsForever() {
        monitor.withLock {
            noChannelGrace = nil
            if noChannelsSince == nil && liveChannels.isEmpty { noChannelsSince = ContinuousClock.now }
        }
    }

    /// Fails the transport if it has had no channel for longer than the grace period.
    /// Returns the time without channels so far (nil: there are channels).
    @discardableResult
    public func checkNoChannelGrace() -> Duration? {
        monitor.lock()
        defer { monitor.unlock() }
        guard let since = noChannelsSince else { return nil }
        let elapsed = ContinuousClock.now - since
        if let grace = noChannelGrace, elapsed > grace && failure == nil {
            failure = .noChannelsLeft("\(lastChannelError); no NIC came back within \(Int(grace.seconds)) s")
            wakeAll()
        }
        return elapsed
    }

    /// Stops everything: producers and channel senders return.
    public func fail(_ error: TransportError) {
        monitor.lock()
        if failure == nil { failure = error }
        wakeAll()
        monitor.unlock()
    }

    /// Wakes every waiting thread (lock held): for failures and channel changes.
    private func wakeAll() {
        senders.broadcast()
        producers.broadcast()
        drained.broadcast()
    }

    public var failureReason: TransportError? { monitor.withLock { failure } }

    /// Starts or stops the backlog clock as the queue and the waiting reader say (lock held).
    private func notePressure() {
        let behind = hasQueued || waitingProducers > 0 && outstandingBytes > 0
        if behind && backlogSince == nil {
            backlogSince = .now
        } else if !behind, let since = backlogSince {
            backlog += .now - since
            backlogSince = nil
        }
    }

    /// The time the channels were behind (see `backlog`) since the last call.
    public func takeBacklog() -> Duration {
        monitor.withLock {
            var total = backlog
            if let since = backlogSince {
                let now = ContinuousClock.now
                total += now - since
                backlogSince = now
            }
            backlog = .zero
            return total
        }
    }
    public var outstanding: Int { monitor.withLock { outstandingBytes } }

    /// Chunks sent again after a channel failed.
    public var retransmittedChunks: Int { monitor.withLock { retransmittedChunkCount } }
    public var retransmittedBytes: UInt64 { monitor.withLock { retransmittedByteCount } }
    public var peakOutstandingBytes: Int { monitor.withLock { peakOutstanding } }
}
