import CFerryLinux
import FerryCompress
import FerryIO
import FerryWire
import Foundation

/// Compression on the source's data path: the ``CompressionAdvisor`` (the choice), shared
/// by every channel's sender, and what the senders measured for it.
///
/// Senders compress at send time, each on its own thread with its own ``Compressor``, so
/// that as many cores compress as there are channels and a chunk sent again after a
/// failover is compressed again (its kept copy stays raw). Every `trialPeriod`th chunk is
/// also compressed with each trial codec and timed on the thread's CPU clock: those are
/// the samples the advisor judges codecs by.
///
/// Shared: every sender plans and records, the watchdog thread ticks, any thread reads.
// Every `var` is under `lock`; `origin` is immutable.
public final class CompressionController: @unchecked Sendable {
    private let lock = Monitor()
    private var advisor: CompressionAdvisor
    private var decision: CompressionAdvisor.Decision
    private var counter = 0
    private var samples: [Codec: CompressionAdvisor.Sample] = [:]
    private let origin: ContinuousClock.Instant
    private var lastTick: ContinuousClock.Instant
    private var last = (guest: UInt64(0), wire: UInt64(0))
    private var guestBytesSoFar: UInt64 = 0
    /// Guest bytes sent by the last tick.
    public var totalGuestBytes: UInt64 { lock.withLock { guestBytesSoFar } }

    /// - Parameters:
    ///   - cores: cores that compression can count on (see ``defaultCores(channels:)``).
    ///   - origin: time zero of the history (the migration's start).
    public init(mode: CompressionMode, cores: Int, origin: ContinuousClock.Instant = .now) {
        advisor = CompressionAdvisor(mode: mode, cores: max(1, cores))
        decision = advisor.decision
        self.origin = origin
        lastTick = .now
    }

    /// Cores compression can count on: one per channel at most (each sender compresses its
    /// own chunks), and all the host's cores but one, left to the QEMU that is migrating.
    public static func defaultCores(channels: Int) -> Int {
        max(1, min(channels, Int(ferry_allowed_cpus()) - 1))
    }

    public var mode: CompressionMode { lock.withLock { advisor.mode } }

    /// The NICs' speeds together (bits per second), when known: lets the advisor tell a
    /// codec that cannot fill the link for want of CPU (see `effectiveCores`). TCP carries
    /// about 94% of a NIC's rate as payload.
    public func setLinkSpeed(bitsPerSecond: UInt64?) {
        lock.withLock { advisor.knownLinkBytesPerSecond = bitsPerSecond.map { Double($0) / 8 * 0.94 } }
    }
    public var currentDecision: CompressionAdvisor.Decision { lock.withLock { decision } }

    /// What a sender does with its next chunk: compress it with `codec` (nil: send it
    /// raw), and if `trials` is not empty, also time each of them (and `codec`) on it.
    func plan() -> (codec: Codec?, trials: [Codec]) {
        lock.withLock {
            counter += 1
            let sampled = decision.trialPeriod > 0 && counter % decision.trialPeriod == 0
            return (decision.codec, sampled ? decision.trials : [])
        }
    }

    func record(_ codec: Codec, input: Int, output: Int, cpuNanoseconds: UInt64) {
        lock.withLock {
            var s = samples[codec] ?? CompressionAdvisor.Sample(inputByteCount: 0, outputByteCount: 0, cpuNanoseconds: 0)
            s.inputByteCount += input
            s.outputByteCount += output
            s.cpuNanoseconds += Int(cpuNanoseconds)
            samples[codec] = s
        }
    }

    /// Feeds the advisor one period's figures: guest and wire bytes sent so far (totals),
    /// and the share of the period chunks waited for a channel. Returns the new choice if
    /// it changed.
    func tick(guestBytes: UInt64, wireBytes: UInt64, backlog: Duration) -> CompressionAdvisor.Decision? {
        lock.withLock {
            let now = ContinuousClock.now
            let seconds = (now - lastTick).seconds
            guard seconds > 0 else { return nil }
            // Before QEMU sends anything (channels opening) there is nothing to judge: a
            // period of nothing would count as an idle link and delay the first choice.
            if guestBytes == last.guest && guestBytesSoFar == 0 {
                lastTick = now
                samples = [:]
                return nil
            }
            let interval = CompressionAdvisor.Interval(
                endSeconds: (now - origin).seconds, seconds: seconds,
                guestByteCount: Int(guestBytes &- last.guest), wireByteCount: Int(wireBytes &- last.wire),
                backlogFraction: min(1, backlog.seconds / seconds), samples: samples)
            lastTick = now
            last = (guestBytes, wireBytes)
            guestBytesSoFar = guestBytes
            samples = [:]
            let before = decision.codec
            decision = advisor.observe(interval)
            return decision.codec != before ? decision : nil
        }
    }

    /// The codec in use over time, for the report.
    public func periods() -> [CompressionAdvisor.Period] {
        lock.withLock { advisor.periods(endingAt: (ContinuousClock.now - origin).seconds) }
    }

    public var history: [CompressionAdvisor.Switch] { lock.withLock { advisor.history } }
}

/// One sender's compression state: its compressor and two scratch buffers (the chunk's
/// compressed bytes, and a trial codec's output, which is only measured). Owned by its
/// sender's thread (not Sendable: it never leaves it).
final class ChunkCompressor {
    private let compressor = Compressor()
    private let output = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkPolicy.maximumChunkByteCount, alignment: 64)
    private let trialOutput = UnsafeMutableRawBufferPointer.allocate(byteCount: ChunkPolicy.maximumChunkByteCount, alignment: 64)

    deinit {
        output.deallocate()
        trialOutput.deallocate()
    }

    /// The chunk's compressed form under the controller's current choice, or nil to send
    /// it raw (compression off, or the bytes did not shrink).
    func compress(_ bytes: UnsafeRawBufferPointer, with controller: CompressionController) -> FrameConnection.Compressed? {
        let (codec, trials) = controller.plan()
        // A chunk never shrinks below its compression header: not worth trying.
        guard bytes.count > CompressionHeader.byteCount * 4 else { return nil }
        for trial in trials where trial != codec {
            let start = ferry_thread_cpu_ns()
            let n = compressor.compress(trial, from: bytes, into: UnsafeMutableRawBufferPointer(rebasing: trialOutput[..<bytes.count]))
            controller.record(trial, input: bytes.count, output: n ?? bytes.count, cpuNanoseconds: ferry_thread_cpu_ns() - start)
        }
        guard let codec else { return nil }
        let start = ferry_thread_cpu_ns()
        // The output must be smaller than the input by at least the compression header.
        let room = bytes.count - CompressionHeader.byteCount
        let n = compressor.compress(codec, from: bytes, into: UnsafeMutableRawBufferPointer(rebasing: output[..<room]))
        if !trials.isEmpty {
            controller.record(codec, input: bytes.count, output: n ?? bytes.count, cpuNanoseconds: ferry_thread_cpu_ns() - start)
        }
        guard let n else { return nil }
        let header = CompressionHeader(codec: codec.wireID, rawByteCount: UInt32(bytes.count), rawCRC: CRC32C.checksum(bytes))
        return FrameConnection.Compressed(header: header, bytes: UnsafeRawBufferPointer(rebasing: output[..<n]))
    }
}
