/// The automatic codec choice (`--compress auto`): a state machine fed with what the
/// data path measured over the last period, answering with the codec for the next one.
///
/// It holds no clock and no thread: the owner measures (about every 0.5 s), calls
/// `observe`, and applies the `Decision`: it compresses every chunk with
/// `Decision.codec`, and 1 chunk in `Decision.trialPeriod` also with each of
/// `Decision.trials`, so that every candidate's ratio and speed stay measured as the
/// guest's memory changes. The samples of a period are the figures of these sampled
/// chunks only, for every trial codec *and* the codec in use: all are measured on the
/// same chunks, so the comparison between them is not blurred by how much the chunks
/// themselves differ (a chunk of code, one of text, one of keys), which estimates taken
/// from different chunks would mistake for a difference between codecs.
///
/// The policy: move the most guest bytes per second, and spend no CPU on compression
/// when the link is not what limits the transfer.
///
/// - While chunks wait for a channel (the backlog), the link is the bottleneck and each
///   candidate `c` is worth `min(L × ratio(c), speed(c) × cores)` guest bytes per second
///   (`cores` as measured once a codec has run CPU-bound: `effectiveCores`),
///   where `L` is the link's capacity in wire bytes per second (measured while the link
///   was the bottleneck without compression), `ratio(c)` is input bytes over the bytes
///   sent for them, and `speed(c)` is input bytes per CPU-second. No compression is worth
///   `L`. The best is chosen, where each step up in CPU cost must gain
///   `Tuning.gainPerCostStep` and leaving the current codec must gain
///   `Tuning.hysteresis` more (so that estimates near a tie do not flap).
/// - Without a backlog, QEMU (the producer, at rate `P`) is the bottleneck. Without
///   compression in use the answer is none, and nothing is tried. With compression in
///   use, the answer steps down to the cheapest candidate that would still carry
///   `P × Tuning.producerHeadroom`; none, when the link alone would.
/// - With compression on and no backlog, none is tried now and then (`Tuning.probeIntervals`)
///   to learn whether the link got faster.
/// - Every change waits until the current choice has run `Tuning.minimumIntervalsBetweenSwitches`,
///   longer when changes come in quick succession.
public struct CompressionAdvisor: Sendable {
    /// Tunables, each with the reason for its value.
    public enum Tuning {
        /// The candidates of `auto`, cheapest in CPU first. Measured on 256 KiB chunks,
        /// ratio and compression speed per core (CPU time), on this project's 2-core
        /// machine (`FERRY_COMPRESS_MEASURE=1 swift test --skip-build --filter
        /// CompressionMeasurement`, Debian's liblz4 1.9.4 and libzstd 1.5.4):
        ///
        ///     data                           lz4              zstd:1          zstd:3
        ///     heap-like (test data)          1.94, 610 MB/s   2.32, 346 MB/s  2.49, 216 MB/s
        ///     text (logs, JSON)              2.50, 632 MB/s   3.75, 379 MB/s  3.90, 298 MB/s
        ///     a Python server's heap (1)     3.55, 1111 MB/s  6.72, 687 MB/s  6.66, 463 MB/s
        ///     random                         1.00, 22 GB/s    1.00, 4.2 GB/s  1.00, 3.9 GB/s
        ///
        /// (1) 64 MiB of its heap and arenas holding 60,000 session records, pages of
        /// zeros left out as QEMU sends them as flags. Decompression runs at 3.4-5.5
        /// GB/s per core for lz4, 1.1-2.0 GB/s for zstd.
        ///
        /// lz4 is the codec of fast links (it compresses 1.6-1.8 times as fast as
        /// zstd:1: with 2 cores it keeps up with 1.2 GB/s, 10 Gbit/s, of guest data);
        /// zstd:1 that of slow ones (20-90% more ratio). zstd:3 is left out: it gains at
        /// most 7% over zstd:1, less than `gainPerCostStep` asks of a step, for 1.3-1.6
        /// times the CPU, so it would hardly ever be chosen and trying it would cost CPU
        /// on every sampled chunk. zstd's fast level -1 lies between the two (heap-like
        /// 2.26 at 393 MB/s) and beats neither where each is chosen.
        public static let candidates: [Codec] = [.lz4, .zstd(level: 1)]
        /// Weight of the newest period in the smoothed figures (exponential moving
        /// averages). 0.5 per 0.5 s period halves an old figure's weight every period:
        /// a change in the data shows in about 2 s (4 periods), while one odd period
        /// moves a figure only half way.
        public static let smoothing = 0.5
        /// The smoothed backlog fraction at which the link becomes the bottleneck, and
        /// the one below which it no longer is. Chunks wait for a channel either nearly
        /// all the time (the link is slower than QEMU) or rarely (in bursts); the gap
        /// keeps a link at the edge from switching compression on and off.
        public static let linkBoundBacklog = 0.5
        public static let notLinkBoundBacklog = 0.25
        /// A period without compression counts towards the link's capacity when chunks
        /// waited at least this fraction of it: then the channels sent all they could.
        /// Periods with compression only raise the figure: their backlog may come from
        /// compressing (the CPU) rather than the link, and a capacity measured too low
        /// would keep compression on when it no longer pays; one measured too high
        /// corrects itself, as it favours none, whose periods measure the link.
        public static let saturatedBacklog = 0.5
        /// With a codec on and a backlog, a wire rate under 3/4 of the link's known speed
        /// means the senders could not compress fast enough to fill it: the CPU is the
        /// limit, and the cores compression really gets are measured from it. (TCP over a
        /// full link carries about 94% of its speed, so 3/4 leaves room for scatter.)
        public static let cpuBoundWireShare = 0.75
        /// Without compression, the link counts as full when the wire carries 85% of the
        /// NICs' known speed (TCP's payload is about 94% of it). Below that, a backlog means
        /// the CPU is the limit and compression is not turned on: on the 2-core lab, 2 x 1
        /// gbit of random data ran at 186-215 MB/s of the NICs' 235, and turning lz4 or
        /// zstd:1 on for the odd compressible pages cost throughput.
        public static let linkFullShare = 0.85
        /// Where the NICs' speed is unknown (veth, some virtual NICs), a codec must promise
        /// 30% more guest bytes per second than none before it is turned on: on unlimited
        /// veth in the lab, where the CPU is the limit, a guest of mostly random data showed
        /// a ratio of 1.2 and lz4 a promised 22% gain, and turning it on cost a third of the
        /// throughput. Compressible data (a ratio of 2 or more) clears 30% easily.
        public static let unknownLinkGain = 0.3
        /// Per period, the measured cores move this share of the way back to `cores`: a
        /// half-life of about 35 s (69 periods), so a codec given up for want of CPU is
        /// tried again about every minute and a half (measured in the advisor's tests),
        /// which costs a few seconds of the slower codec if the CPU is still short.
        public static let coresRecovery = 0.01
        /// What each step up in CPU cost (none, lz4, zstd:1) must gain in guest bytes
        /// per second. Estimates from 1 chunk in 16 scatter by a few percent; 8% keeps a
        /// codec from being chosen on noise, and keeps CPU for QEMU and the guest when
        /// the gain is small.
        public static let gainPerCostStep = 0.08
        /// What a candidate must gain beyond that to replace the current choice. With
        /// 5%, estimates have to move by 10% around a tie before the choice goes back
        /// and forth.
        public static let hysteresis = 0.05
        /// Without a backlog, a cheaper candidate replaces the current one only if it
        /// would carry 1.2 times QEMU's current rate: less would put the link back at
        /// the edge, and the choice would go up again.
        public static let producerHeadroom = 1.2
        /// A choice runs at least this many periods (2 s at 0.5 s) before the next
        /// change, so that the figures of the new one are measured before it is judged.
        public static let minimumIntervalsBetweenSwitches = 4
        /// Each change back to the codec before (A, B, A) within `calmIntervals` (60 s)
        /// doubles that pause, up to 60 periods (30 s); a calm minute brings it back to
        /// 2 s. Near a tie, with noisy figures (the simulation's ±30%), hysteresis alone
        /// still let the choice change every 10 s; with the doubling a pair of codecs
        /// that keep trading places changes about every 30 s, while changes in one
        /// direction (zstd:1, lz4, none as data turns random) keep the 2 s pause. At a
        /// tie either choice moves about as many bytes, so waiting costs little.
        public static let maximumIntervalsBetweenSwitches = 60
        public static let calmIntervals = 120
        /// With compression on and no backlog, the link's capacity cannot be measured (it
        /// carries less than it could), so a link that became faster goes unnoticed and
        /// compression stays on for nothing. Every 60 s (120 periods) of that, none is
        /// tried: if the backlog comes back, the codec before it returns at once (the
        /// pause between switches does not apply), the link measured. That costs about
        /// one period of the raw rate per minute, under 1%.
        public static let probeIntervals = 120
        /// Sampling: 1 chunk in 16 keeps the figures fresh (a 100 Mbit/s link carries 48
        /// chunks a second raw, so 3 a second are sampled) for at most 6% of each trial
        /// codec's full cost; 1 in 4 until every candidate has figures, so that the first
        /// choice comes within a second or two; 1 in 64 while no codec can win
        /// (incompressible data, or compression slower than the link), to notice a
        /// change at a quarter of the cost.
        public static let trialPeriod = 16
        public static let bootstrapTrialPeriod = 4
        public static let idleTrialPeriod = 64
        /// A candidate's figures count once it has compressed 1 MiB (4 chunks) and was
        /// measured in the last 16 periods (8 s); older ones may describe other data.
        public static let minimumSampleByteCount = 1 << 20
        public static let staleAfterIntervals = 16
    }

    /// What one codec did over a period on the sampled chunks (not on the others).
    public struct Sample: Sendable, Equatable {
        /// Bytes given to the codec.
        public var inputByteCount: Int
        /// Bytes that would go on the wire for them: the compressed size, or the input
        /// size for chunks that did not shrink (they go uncompressed).
        public var outputByteCount: Int
        /// CPU time spent compressing them (thread CPU time, not wall time).
        public var cpuNanoseconds: Int

        public init(inputByteCount: Int, outputByteCount: Int, cpuNanoseconds: Int) {
            self.inputByteCount = inputByteCount
            self.outputByteCount = outputByteCount
            self.cpuNanoseconds = cpuNanoseconds
        }
    }

    /// One measurement period (about 0.5 s), as the owner measured it.
    public struct Interval: Sendable {
        /// The end of the period, in seconds since the transfer started (for the history).
        public var endSeconds: Double
        /// The period's length.
        public var seconds: Double
        /// Guest bytes (QEMU's stream, before compression) sent in the period.
        public var guestByteCount: Int
        /// Bytes put on the data channels in the period (after compression).
        public var wireByteCount: Int
        /// Fraction (0...1) of the period during which chunks waited for a channel.
        public var backlogFraction: Double
        /// What each codec did on the chunks sampled in the period: every trial codec
        /// and the codec in use, on the same chunks.
        public var samples: [Codec: Sample]

        public init(endSeconds: Double, seconds: Double, guestByteCount: Int, wireByteCount: Int,
                    backlogFraction: Double, samples: [Codec: Sample] = [:]) {
            self.endSeconds = endSeconds
            self.seconds = seconds
            self.guestByteCount = guestByteCount
            self.wireByteCount = wireByteCount
            self.backlogFraction = backlogFraction
            self.samples = samples
        }
    }

    /// What to do in the next period.
    public struct Decision: Sendable, Equatable {
        /// The codec for every chunk; nil: none.
        public var codec: Codec?
        /// Codecs to try, besides `codec`, on the sampled chunks.
        public var trials: [Codec]
        /// Sample 1 chunk in this many: compress it with each of `trials` as well, and
        /// report what they and `codec` did on it. 0: sample nothing.
        public var trialPeriod: Int
        /// Why, for logs.
        public var reason: String
    }

    /// A change of codec, for the report's "codec used over time".
    public struct Switch: Sendable, Equatable {
        /// When, in the owner's seconds since the transfer started.
        public var atSeconds: Double
        /// The codec from then on; nil: none.
        public var codec: Codec?
        public var reason: String
    }

    /// A span of time under one codec.
    public struct Period: Sendable, Equatable {
        public var codec: Codec?
        public var fromSeconds: Double
        public var toSeconds: Double
    }

    /// What the advisor believes of a codec now.
    public struct Estimate: Sendable, Equatable {
        /// Input bytes per byte sent.
        public var ratio: Double
        /// Input bytes compressed per CPU-second.
        public var bytesPerCPUSecond: Double
    }

    /// Smoothed sums of a codec's samples, and how fresh they are.
    private struct Figures: Sendable {
        var input = 0.0
        var output = 0.0
        var cpuSeconds = 0.0
        var totalInputByteCount = 0
        var lastInterval = 0
    }

    public let mode: CompressionMode
    public let cores: Int
    public let candidates: [Codec]
    public private(set) var decision: Decision
    public private(set) var history: [Switch]
    /// The link's capacity in wire bytes per second, once measured.
    public private(set) var linkBytesPerSecond: Double?
    /// Whether the link is the bottleneck now (smoothed backlog, with hysteresis).
    public private(set) var linkBound = false

    private var figures: [Codec: Figures] = [:]
    private var backlog = 0.0
    private var producerBytesPerSecond: Double?
    private var intervals = 0
    /// The cores compression has really had (smoothed), when that was fewer than `cores`:
    /// on a host where QEMU and the guest take their share, the senders do not get a core
    /// each. Measured while a codec runs and the link, at that codec's ratio, could have
    /// carried more than went: then the CPU was the limit, and the guest rate over the
    /// codec's speed per core is the cores it had.
    public private(set) var effectiveCores: Double?
    /// What the NICs can carry, bytes per second (their speeds, less TCP's overhead), if
    /// known; without it the cores are taken as given.
    public var knownLinkBytesPerSecond: Double?
    private var lastWireBytesPerSecond = 0.0
    private var intervalsSinceSwitch = Tuning.calmIntervals
    /// The pause before the next change (see `Tuning.calmIntervals`).
    private var intervalsBetweenSwitches = Tuning.minimumIntervalsBetweenSwitches
    /// While none is being tried (see `Tuning.probeIntervals`): the codec before it.
    private var probedCodec: Codec?

    /// `cores`: how many cores compression may use at once (the threads that compress,
    /// at most the CPUs the process may run on).
    public init(mode: CompressionMode, cores: Int, candidates: [Codec] = Tuning.candidates) {
        precondition(cores >= 1, "compression needs at least one core")
        self.mode = mode
        self.cores = cores
        self.candidates = candidates
        switch mode {
        case .none:
            decision = Decision(codec: nil, trials: [], trialPeriod: 0, reason: "compression off")
        case .fixed(let codec):
            decision = Decision(codec: codec, trials: [], trialPeriod: 0, reason: "\(codec) chosen by the user")
        case .auto:
            decision = Decision(codec: nil, trials: candidates, trialPeriod: Tuning.bootstrapTrialPeriod, reason: "nothing measured yet")
        }
        history = [Switch(atSeconds: 0, codec: decision.codec, reason: decision.reason)]
    }

    /// The advisor's figures for `codec`, if it has any.
    public func estimate(_ codec: Codec) -> Estimate? {
        guard let f = figures[codec], f.output > 0, f.cpuSeconds > 0 else { return nil }
        return Estimate(ratio: f.input / f.output, bytesPerCPUSecond: f.input / f.cpuSeconds)
    }

    /// The history as spans of time, the last one ending at `endSeconds`.
    public func periods(endingAt endSeconds: Double) -> [Period] {
        history.indices.map { i in
            Period(codec: history[i].codec, fromSeconds: history[i].atSeconds,
                   toSeconds: i + 1 < history.count ? history[i + 1].atSeconds : max(endSeconds, history[i].atSeconds))
        }
    }

    /// Takes the figures of the period that just ended and decides the next one.
    public mutating func observe(_ interval: Interval) -> Decision {
        guard case .auto = mode else { return decision }
        guard interval.seconds > 0 else { return decision }
        intervals += 1
        intervalsSinceSwitch += 1
        learn(from: interval)

        var (choice, reason) = choose()
        var codec = decision.codec
        var why = decision.reason
        var probe: Codec?
        if choice == codec, let current = codec, !linkBound, intervalsSinceSwitch >= Tuning.probeIntervals {
            (choice, probe) = (nil, current)
            reason = "trying whether the link carries QEMU's \(rate(producerBytesPerSecond ?? 0)) uncompressed"
        }
        if let previous = probedCodec, linkBound {
            // The link cannot carry it raw: back to what ran before, at once.
            (choice, reason) = (previous, "\(previous) again: uncompressed, the link is the bottleneck at \(rate(linkBytesPerSecond ?? 0))")
        }
        let failedProbe = probedCodec != nil && linkBound
        if choice != codec && (intervalsSinceSwitch >= intervalsBetweenSwitches || failedProbe) {
            if probe == nil && !failedProbe {
                let reversal = history.count >= 2 && history[history.count - 2].codec == choice
                if intervalsSinceSwitch >= Tuning.calmIntervals {
                    intervalsBetweenSwitches = Tuning.minimumIntervalsBetweenSwitches
                } else if reversal {
                    intervalsBetweenSwitches = min(2 * intervalsBetweenSwitches, Tuning.maximumIntervalsBetweenSwitches)
                }
            }
            codec = choice
            why = reason
            intervalsSinceSwitch = 0
            probedCodec = probe
            history.append(Switch(atSeconds: interval.endSeconds, codec: codec, reason: reason))
        } else if choice == codec {
            why = reason
        }
        let (trials, period) = sampling(current: codec)
        decision = Decision(codec: codec, trials: trials, trialPeriod: period, reason: why)
        return decision
    }

    // MARK: - Measurements

    private mutating func learn(from interval: Interval) {
        let a = Tuning.smoothing
        let wireRate = Double(interval.wireByteCount) / interval.seconds
        lastWireBytesPerSecond = wireRate
        let guestRate = Double(interval.guestByteCount) / interval.seconds
        let fraction = min(max(interval.backlogFraction, 0), 1)

        backlog = intervals == 1 ? fraction : (1 - a) * backlog + a * fraction
        if linkBound, backlog < Tuning.notLinkBoundBacklog { linkBound = false }
        // Rising, one period suffices (a period with chunks waiting half the time is no
        // accident, and each second of doubt sends a second of raw bytes); falling takes
        // the smoothed figure, so compression does not go off on one quiet period.
        if !linkBound, backlog >= Tuning.linkBoundBacklog || fraction >= Tuning.linkBoundBacklog { linkBound = true }

        for (codec, sample) in interval.samples where sample.inputByteCount > 0 {
            let cpu = Double(max(sample.cpuNanoseconds, 1)) / 1e9
            let output = Double(min(max(sample.outputByteCount, 1), sample.inputByteCount))
            var f = figures[codec] ?? Figures()
            if f.totalInputByteCount == 0 || intervals - f.lastInterval > Tuning.staleAfterIntervals {
                f = Figures(input: Double(sample.inputByteCount), output: output, cpuSeconds: cpu)
            } else {
                f.input = (1 - a) * f.input + a * Double(sample.inputByteCount)
                f.output = (1 - a) * f.output + a * output
                f.cpuSeconds = (1 - a) * f.cpuSeconds + a * cpu
            }
            f.totalInputByteCount += sample.inputByteCount
            f.lastInterval = intervals
            figures[codec] = f
        }

        // The link's capacity: what it carried while it was the bottleneck without
        // compression (`decision` is still the one this period ran under); any period
        // shows it can carry at least what it did.
        if wireRate > 0 {
            if let link = linkBytesPerSecond {
                if (fraction >= Tuning.saturatedBacklog && decision.codec == nil) || wireRate > link {
                    linkBytesPerSecond = (1 - a) * link + a * wireRate
                }
            } else {
                linkBytesPerSecond = wireRate
            }
        }
        producerBytesPerSecond = producerBytesPerSecond.map { (1 - a) * $0 + a * guestRate } ?? guestRate

        // Cores really had, judged against the link's known speed (a measured capacity
        // scatters too much for this): while a codec ran with a backlog (the senders busy)
        // and the wire still carried clearly less than the link can, compressing held the
        // transfer back, and the guest rate over the codec's speed is the cores it had.
        // Nothing is learnt otherwise (a codec that fills the link says nothing about
        // cores), but the figure drifts back to `cores` so that a busy spell is forgotten.
        if let known = knownLinkBytesPerSecond, let current = decision.codec, let e = usable(current) {
            if fraction >= Tuning.saturatedBacklog, guestRate > 0, wireRate < Tuning.cpuBoundWireShare * known {
                let had = min(Double(cores), guestRate / e.bytesPerCPUSecond)
                effectiveCores = effectiveCores.map { (1 - a) * $0 + a * had } ?? had
            } else if let had = effectiveCores {
                effectiveCores = had + Tuning.coresRecovery * (Double(cores) - had)
            }
        }
    }

    /// Figures recent and large enough to decide on.
    private func usable(_ codec: Codec) -> Estimate? {
        guard let f = figures[codec], f.totalInputByteCount >= Tuning.minimumSampleByteCount,
              intervals - f.lastInterval <= Tuning.staleAfterIntervals else { return nil }
        return estimate(codec)
    }

    /// Guest bytes per second `codec` (nil: none) can carry: what the link carries of
    /// its output, or what the cores compress, whichever is less.
    private func capacity(_ codec: Codec?) -> Double? {
        let link = linkBytesPerSecond ?? .infinity
        guard let codec else { return link }
        guard let e = usable(codec) else { return nil }
        return min(link * e.ratio, e.bytesPerCPUSecond * (effectiveCores ?? Double(cores)))
    }

    // MARK: - Choice

    private func choose() -> (Codec?, String) {
        let current = decision.codec
        if !linkBound {
            guard let current else {
                return (nil, "the link is not the bottleneck (backlog \(format(backlog)))")
            }
            // Compression may be what keeps the link from being the bottleneck: step down
            // only to what would still carry QEMU's rate with room to spare.
            let needed = (producerBytesPerSecond ?? 0) * Tuning.producerHeadroom
            let options: [Codec?] = [nil] + candidates.prefix { $0 != current }.map { Optional($0) }
            for option in options {
                if let c = capacity(option), c >= needed {
                    return (option, "\(name(option)) carries QEMU's \(rate(producerBytesPerSecond ?? 0)) (up to \(rate(c)))")
                }
            }
            return (current, "QEMU's \(rate(producerBytesPerSecond ?? 0)) needs \(current)")
        }

        // The link is the bottleneck: the most guest bytes per second, with a margin per
        // step of CPU cost and another for leaving the current choice.
        // The latest period counts as well as the smoothed capacity: the first periods of a
        // transfer start mid-way and would hold the smoothed figure low for a second or two.
        if current == nil, let known = knownLinkBytesPerSecond, let link = linkBytesPerSecond,
           max(link, lastWireBytesPerSecond) < Tuning.linkFullShare * known {
            // The channels are behind, yet the wire carries clearly less than the NICs can:
            // the CPU holds the transfer back, and compressing would take more of it.
            return (nil, "the NICs carry \(rate(link)) of their \(rate(known)): the CPU, not the link, is the limit")
        }
        // Where the NICs' speed is unknown, a backlog may be the CPU's as well as the
        // link's, so compression must promise a larger gain before it is turned on.
        let unknownLinkMargin = knownLinkBytesPerSecond == nil ? 1 + Tuning.unknownLinkGain : 1
        let options: [Codec?] = [nil] + candidates.map { Optional($0) }
        var best: (codec: Codec?, score: Double, rate: Double)?
        for (step, option) in options.enumerated() {
            guard let c = capacity(option) else { continue }
            var score = c / compounded(1 + Tuning.gainPerCostStep, step)
            if option != nil && current == nil { score /= unknownLinkMargin }
            if option == current { score *= 1 + Tuning.hysteresis }
            if best == nil || score > best!.score { best = (option, score, c) }
        }
        guard let best else { return (current, "no figures yet") }
        let link = rate(linkBytesPerSecond ?? 0)
        if let codec = best.codec, let e = usable(codec) {
            return (codec, "link-bound at \(link): \(codec) (ratio \(format(e.ratio)), \(rate(e.bytesPerCPUSecond)) per core) carries \(rate(best.rate))")
        }
        return (nil, "link-bound at \(link): no codec carries more with enough margin")
    }

    private func sampling(current: Codec?) -> ([Codec], Int) {
        // Idle link, no compression: no CPU on compression at all, once every candidate
        // has its first figures. Those few chunks (4 per codec, 1 in 4 sampled) are
        // measured from the start, so that when the link turns out to be the bottleneck
        // the choice comes at once instead of a period or two later (on a 1 Gbit/s link,
        // 100 MB of guest memory went raw per second of delay).
        let unmeasured = candidates.contains { (figures[$0]?.totalInputByteCount ?? 0) < Tuning.minimumSampleByteCount }
        if case .auto = mode, current == nil, !linkBound, unmeasured, intervals <= Tuning.staleAfterIntervals {
            return (candidates, Tuning.bootstrapTrialPeriod)
        }
        guard linkBound || current != nil else { return ([], 0) }
        // The codec in use is sampled too (at no cost: it compresses every chunk), so
        // that its figures stay fresh even when there is nothing to try beside it.
        let trials = candidates.filter { $0 != current }
        guard !trials.isEmpty || current != nil else { return ([], 0) }
        if (trials + [current].compactMap { $0 }).contains(where: { capacity($0) == nil }) {
            return (trials, Tuning.bootstrapTrialPeriod)
        }
        let plain = capacity(nil) ?? .infinity
        let hopeless = current == nil && candidates.allSatisfy { capacity($0).map { $0 <= plain } ?? false }
        return (trials, hopeless ? Tuning.idleTrialPeriod : Tuning.trialPeriod)
    }

    private func name(_ codec: Codec?) -> String { codec?.description ?? "none" }

    /// `12.3 MB/s`.
    private func rate(_ bytesPerSecond: Double) -> String { "\(format(bytesPerSecond / 1e6)) MB/s" }

    /// Two decimals, without Foundation.
    private func format(_ x: Double) -> String {
        guard x.isFinite else { return "∞" }
        let hundredths = Int((x * 100).rounded())
        let fraction = abs(hundredths % 100)
        return "\(hundredths / 100).\(fraction < 10 ? "0" : "")\(fraction)"
    }
}

/// `base` to the power `exponent`.
private func compounded(_ base: Double, _ exponent: Int) -> Double {
    (0..<exponent).reduce(1.0) { x, _ in x * base }
}
