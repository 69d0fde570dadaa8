import Testing
@testable import FerryCompress

typealias Advisor = CompressionAdvisor

/// What compressing the guest's data costs and gains, per codec.
struct DataModel {
    /// Input bytes per byte sent.
    var ratio: [Codec: Double]
    /// Input bytes per CPU-second.
    var speed: [Codec: Double]

    /// Heap-like data, as measured on 256 KiB chunks (`CompressionMeasurement`).
    static let compressible = DataModel(ratio: [.lz4: 1.94, .zstd(level: 1): 2.32], speed: [.lz4: 610e6, .zstd(level: 1): 346e6])
    /// Random data, as measured.
    static let incompressible = DataModel(ratio: [.lz4: 1, .zstd(level: 1): 1], speed: [.lz4: 22e9, .zstd(level: 1): 4.2e9])
}

/// A model of the data path around the advisor: QEMU producing at a rate, a link, cores
/// compressing, 256 KiB chunks of which 1 in `trialPeriod` is compressed with every trial
/// codec and the codec in use. Each step is a 0.5 s period measured under the advisor's
/// last decision.
///
/// Noise (relative, uniform, ±`noise`) as a real data path has it: on the link rate; on
/// how compressible the period's data is (the same for every codec); more of it on the
/// sampled chunks, which are few; a quarter of it for each codec on its own (codecs take
/// to the same data differently); on each codec's speed (preemption, clock changes); and
/// on the backlog.
struct Simulation {
    var link: Double
    var producer: Double
    var data: DataModel
    var noise = 0.0
    /// The cores compression really gets (nil: as many as the advisor was told).
    var actualCores: Double?
    var advisor: Advisor
    private var rng: SplitMix64
    private var chunkIndex = 0
    private(set) var time = 0.0
    private(set) var decisions: [Advisor.Decision] = []
    static let seconds = 0.5
    static let chunk = 256.0 * 1024

    init(link: Double, producer: Double, data: DataModel, cores: Int = 2, noise: Double = 0, mode: CompressionMode = .auto,
         candidates: [Codec] = Advisor.Tuning.candidates, seed: UInt64 = 5) {
        rng = SplitMix64(seed: seed)
        self.link = link
        self.producer = producer
        self.data = data
        self.noise = noise
        advisor = Advisor(mode: mode, cores: cores, candidates: candidates)
    }

    private mutating func jitter(_ amount: Double) -> Double { 1 + amount * (Double(rng.next() % 2001) / 1000 - 1) }

    @discardableResult
    mutating func run(_ steps: Int) -> [Advisor.Decision] {
        (0..<steps).map { _ in step() }
    }

    mutating func step() -> Advisor.Decision {
        let decision = advisor.decision
        let link = self.link * jitter(noise)
        let compressibility = jitter(noise)
        let sampledCompressibility = compressibility * jitter(noise)
        func ratio(_ codec: Codec, _ c: Double) -> Double { max(1, 1 + (data.ratio[codec]! - 1) * c) }
        var speed: [Codec: Double] = [:]
        for (codec, s) in data.speed { speed[codec] = s * jitter(noise) }

        let capacity = decision.codec.map { min(link * ratio($0, compressibility), speed[$0]! * (actualCores ?? Double(advisor.cores))) } ?? link
        let guest = min(producer, capacity) * Self.seconds
        let wire = decision.codec.map { guest / ratio($0, compressibility) } ?? guest
        let backlog = min(1, max(0, (producer > capacity ? 0.95 : 0.05) + 0.3 * (jitter(noise) - 1)))

        let chunks = Int(guest / Self.chunk)
        var samples: [Codec: Advisor.Sample] = [:]
        if decision.trialPeriod > 0 {
            let sampled = Double((chunkIndex..<(chunkIndex + chunks)).filter { $0 % decision.trialPeriod == 0 }.count) * Self.chunk
            if sampled > 0 {
                for codec in decision.trials + (decision.codec.map { [$0] } ?? []) {
                    let r = ratio(codec, sampledCompressibility) * jitter(noise / 4)
                    samples[codec] = Advisor.Sample(inputByteCount: Int(sampled), outputByteCount: Int(sampled / max(1, r)),
                                                    cpuNanoseconds: Int(sampled / speed[codec]! * 1e9))
                }
            }
        }
        chunkIndex += chunks
        time += Self.seconds
        let next = advisor.observe(Advisor.Interval(endSeconds: time, seconds: Self.seconds, guestByteCount: Int(guest),
                                                    wireByteCount: Int(wire), backlogFraction: backlog, samples: samples))
        decisions.append(next)
        return next
    }

    var switches: Int { advisor.history.count - 1 }
    var timeline: [String] { advisor.history.map { "\($0.atSeconds)s \($0.codec?.description ?? "none"): \($0.reason)" } }
}

let gbit = 125e6

@Suite("Compression advisor")
struct AdvisorTests {
    @Test("an idle link: no compression, and no CPU spent trying")
    func idleLink() {
        var sim = Simulation(link: 1 * gbit, producer: 20e6, data: .compressible)
        let decisions = sim.run(60)
        #expect(decisions.allSatisfy { $0.codec == nil && $0.trials.isEmpty && $0.trialPeriod == 0 })
        #expect(sim.switches == 0)
        #expect(!sim.advisor.linkBound)
    }

    @Test("a saturated slow link and compressible data: the codec that moves the most")
    func slowLinkCompressible() {
        var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: .compressible)
        sim.run(20)
        // none carries 12.5 MB/s, lz4 24.3, zstd:1 29: zstd:1 gains 20% over lz4.
        #expect(sim.advisor.decision.codec == .zstd(level: 1))
        #expect(sim.advisor.history.map(\.codec) == [nil, .zstd(level: 1)])
        #expect(sim.advisor.history[1].atSeconds <= 2, "chosen within 2 s")
        #expect(sim.advisor.decision.trials == [.lz4])
        #expect(sim.advisor.decision.trialPeriod == Advisor.Tuning.trialPeriod)
        let e = sim.advisor.estimate(.zstd(level: 1))
        #expect(e.map { abs($0.ratio - 2.32) < 0.05 } == true)
    }

    @Test("a slow link and CPU enough only for lz4: lz4")
    func slowLinkFewCores() {
        var data = DataModel.compressible
        data.speed[.zstd(level: 1)] = 25e6  // zstd:1 on one slow core: below what lz4 carries
        var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: data, cores: 1)
        sim.run(20)
        #expect(sim.advisor.decision.codec == .lz4)
    }

    @Test("a single candidate stays measured and chosen")
    func singleCandidate() {
        var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: .compressible, noise: 0.1, candidates: [.lz4])
        sim.run(200)
        #expect(sim.advisor.history.map(\.codec) == [nil, .lz4], "\(sim.timeline)")
        #expect(sim.advisor.decision.trials.isEmpty && sim.advisor.decision.trialPeriod == Advisor.Tuning.trialPeriod)
    }

    @Test("a saturated link and incompressible data: none, and trials only now and then")
    func saturatedIncompressible() {
        var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: .incompressible)
        let decisions = sim.run(40)
        #expect(decisions.allSatisfy { $0.codec == nil })
        #expect(sim.advisor.linkBound)
        #expect(sim.advisor.decision.trialPeriod == Advisor.Tuning.idleTrialPeriod)
    }

    @Test("a fast link where the CPU is the limit: none")
    func cpuBound() {
        // lz4 on 2 cores compresses 1.22 GB/s, below the 1.25 GB/s the link carries raw.
        var sim = Simulation(link: 10 * gbit, producer: 3e9, data: .compressible)
        let decisions = sim.run(40)
        #expect(decisions.allSatisfy { $0.codec == nil })
        #expect(sim.advisor.decision.trialPeriod == Advisor.Tuning.idleTrialPeriod)
    }

    @Test("data turning random mid-way: back to none, and on again when it compresses again")
    func dataChanges() {
        var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: .compressible)
        sim.run(40)
        #expect(sim.advisor.decision.codec != nil)
        sim.data = .incompressible
        let random = sim.run(40)
        let off = random.firstIndex { $0.codec == nil }
        #expect(off.map { $0 < 8 } == true, "none within 4 s, at \(String(describing: off)): \(sim.timeline)")
        #expect(random.suffix(30).allSatisfy { $0.codec == nil })
        sim.data = .compressible
        let back = sim.run(60)
        let on = back.firstIndex { $0.codec != nil }
        #expect(on.map { $0 < 40 } == true, "on again within 20 s, at \(String(describing: on))")
        // Down and up, each possibly by way of lz4 while the figures move.
        #expect(sim.switches <= 6, "\(sim.timeline)")
    }

    @Test("noisy measurements do not flap", arguments: [0.1, 0.3], 1...8 as ClosedRange<UInt64>)
    func noisy(noise: Double, seed: UInt64) {
        var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: .compressible, noise: noise, seed: seed)
        sim.run(400)
        #expect(sim.advisor.decision.codec == .zstd(level: 1))
        #expect(sim.switches <= 2, "\(sim.switches) switches: \(sim.timeline)")
    }

    @Test("near a tie, noise does not flap", arguments: [0.1, 0.3], 1...8 as ClosedRange<UInt64>)
    func nearTie(noise: Double, seed: UInt64) {
        // zstd:1 carries exactly what a step up in cost must gain over lz4.
        var data = DataModel.compressible
        data.ratio[.zstd(level: 1)] = data.ratio[.lz4]! * (1 + Advisor.Tuning.gainPerCostStep)
        var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: data, noise: noise, seed: seed)
        sim.run(400)
        #expect(sim.advisor.decision.codec != nil)
        // At most about one change in 30 s (`Tuning.maximumIntervalsBetweenSwitches`).
        #expect(sim.switches <= (noise < 0.2 ? 4 : 10), "\(sim.switches) switches: \(sim.timeline)")
        let gaps = zip(sim.advisor.history.dropFirst(), sim.advisor.history.dropFirst(2)).map { $1.atSeconds - $0.atSeconds }
        // The pause doubles with each change back: 2, 4, 8, 16 s, then 30 s; a calm minute
        // (no change for 60 s) starts it again at 2 s.
        let calm = Double(Advisor.Tuning.calmIntervals) / 2
        var segments: [[Double]] = [[]]
        for gap in gaps {
            segments[segments.count - 1].append(gap)
            if gap >= calm { segments.append([]) }
        }
        #expect(segments.allSatisfy { $0.dropLast().dropFirst(6).allSatisfy { $0 >= 30 } }, "\(gaps)")
    }

    @Test("on a host whose cores are busy elsewhere, the codec that fills the link with the CPU it really gets wins, and stays")
    func busyCores() {
        // The lab's case: 1 Gbit/s, text, both hosts on 2 cores. zstd:1 would carry more by
        // its figures on a whole core, but the senders get about half of one.
        var data = DataModel.compressible
        data.ratio = [.lz4: 3.3, .zstd(level: 1): 4.9]
        data.speed = [.lz4: 630e6, .zstd(level: 1): 470e6]
        var sim = Simulation(link: 117e6, producer: 500e6, data: data, cores: 1)
        sim.actualCores = 0.55
        sim.advisor.knownLinkBytesPerSecond = 117e6
        sim.run(120)
        #expect(sim.advisor.decision.codec == .lz4, "\(sim.timeline)")
        #expect(sim.switches <= 3, "\(sim.timeline)")
        #expect((sim.advisor.effectiveCores ?? 1) < 1, "the cores it really had were measured")
        // The same without the link's speed: the advisor trusts its cores and keeps zstd:1.
        var blind = Simulation(link: 117e6, producer: 500e6, data: data, cores: 1)
        blind.actualCores = 0.55
        blind.run(120)
        #expect(blind.advisor.decision.codec == .zstd(level: 1))
    }

    /// Periods of a transfer held back by the CPU: a full backlog, the wire at `wire`
    /// bytes/s, and every candidate sampled at `ratio` on 4 MiB.
    func cpuBoundPeriods(_ advisor: inout Advisor, wire: Double, ratio: Double, count: Int) {
        for i in 1...count {
            let sample = Advisor.Sample(inputByteCount: 4 << 20, outputByteCount: Int(Double(4 << 20) / ratio), cpuNanoseconds: 2_500_000)
            _ = advisor.observe(Advisor.Interval(endSeconds: Double(i) / 2, seconds: 0.5, guestByteCount: Int(wire / 2),
                                                 wireByteCount: Int(wire / 2), backlogFraction: 0.95,
                                                 samples: [.lz4: sample, .zstd(level: 1): sample]))
        }
    }

    @Test("a backlog while the NICs carry well under their known speed is the CPU's: no compression")
    func cpuNotLink() {
        var advisor = Advisor(mode: .auto, cores: 1)
        advisor.knownLinkBytesPerSecond = 235e6
        cpuBoundPeriods(&advisor, wire: 190e6, ratio: 1.3, count: 20)
        #expect(advisor.decision.codec == nil, "\(advisor.decision.reason)")
        #expect(advisor.decision.reason.contains("the CPU, not the link"))
        // The same link full (wire at its speed): now compression pays.
        var full = Advisor(mode: .auto, cores: 1)
        full.knownLinkBytesPerSecond = 235e6
        cpuBoundPeriods(&full, wire: 230e6, ratio: 1.3, count: 20)
        #expect(full.decision.codec != nil, "\(full.decision.reason)")
    }

    @Test("with the NICs' speed unknown, a small promised gain does not turn compression on; a large one does")
    func unknownLink() {
        var slight = Advisor(mode: .auto, cores: 1)
        cpuBoundPeriods(&slight, wire: 220e6, ratio: 1.2, count: 20)
        #expect(slight.decision.codec == nil, "\(slight.decision.reason)")
        var text = Advisor(mode: .auto, cores: 1)
        cpuBoundPeriods(&text, wire: 110e6, ratio: 2.5, count: 20)
        #expect(text.decision.codec != nil, "\(text.decision.reason)")
    }

    @Test("compression that makes QEMU the bottleneck stays on, at the cheapest codec that suffices")
    func producerBound() {
        // Raw, the link carries 10 MB/s of QEMU's 20; lz4 carries 30, zstd:1 36.
        var data = DataModel.compressible
        data.ratio = [.lz4: 3, .zstd(level: 1): 3.6]
        var sim = Simulation(link: 10e6, producer: 20e6, data: data)
        sim.run(400)
        #expect(sim.advisor.decision.codec == .lz4)
        // Once a minute none is tried, and given up after a period.
        let late = sim.decisions.suffix(300)
        #expect(late.filter { $0.codec == .lz4 }.count >= 295, "\(sim.timeline)")
        let probes = sim.advisor.history.filter { $0.codec == nil }.count - 1
        #expect(probes >= 2 && probes <= 4, "\(sim.timeline)")
        #expect(sim.switches <= 2 + 2 * probes, "\(sim.timeline)")
    }

    @Test("a faster link lets compression go when it is no longer needed")
    func linkGetsFaster() {
        var sim = Simulation(link: 10e6, producer: 20e6, data: .compressible)
        sim.run(40)
        #expect(sim.advisor.decision.codec != nil)
        // The link now carries QEMU's rate raw with room to spare: the next try of none
        // (within a minute) finds it out, and none stays.
        sim.link = 100e6
        let after = sim.run(Advisor.Tuning.probeIntervals + 40)
        #expect(after.suffix(30).allSatisfy { $0.codec == nil && $0.trials.isEmpty }, "\(sim.timeline)")
    }

    @Test("QEMU slowing down lets compression go")
    func producerSlowsDown() {
        var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: .compressible)
        sim.run(20)
        #expect(sim.advisor.decision.codec != nil)
        sim.producer = 5e6
        let after = sim.run(20)
        #expect(after.suffix(10).allSatisfy { $0.codec == nil && $0.trials.isEmpty }, "\(sim.timeline)")
    }

    @Test("fixed and none modes decide once and try nothing")
    func fixedModes() {
        for (mode, codec) in [(CompressionMode.none, nil), (.fixed(.zstd(level: 3)), Codec.zstd(level: 3)), (.fixed(.lz4), .lz4)] {
            var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: .compressible, mode: mode)
            sim.data.ratio[.zstd(level: 3)] = 3
            sim.data.speed[.zstd(level: 3)] = 180e6
            let decisions = sim.run(20)
            #expect(decisions.allSatisfy { $0.codec == codec && $0.trials.isEmpty })
            #expect(sim.advisor.history.map(\.codec) == [codec])
        }
    }

    @Test("the history gives the codec used over time")
    func history() {
        var sim = Simulation(link: 0.1 * gbit, producer: 500e6, data: .compressible)
        sim.run(20)
        sim.data = .incompressible
        sim.run(20)
        let periods = sim.advisor.periods(endingAt: sim.time)
        // zstd:1, then none (possibly by way of lz4 while the figures move).
        #expect(periods.map(\.codec).prefix(2) == [nil, .zstd(level: 1)])
        #expect(periods.last?.codec == nil)
        #expect(periods.count <= 4)
        #expect(periods.first?.fromSeconds == 0)
        #expect(periods.last?.toSeconds == sim.time)
        for (a, b) in zip(periods, periods.dropFirst()) { #expect(a.toSeconds == b.fromSeconds) }
        #expect(sim.advisor.history.allSatisfy { !$0.reason.isEmpty })
    }

    @Test("periods of no length and empty samples change nothing")
    func degenerateIntervals() {
        var advisor = Advisor(mode: .auto, cores: 2)
        let before = advisor.decision
        #expect(advisor.observe(.init(endSeconds: 0, seconds: 0, guestByteCount: 1 << 20, wireByteCount: 1 << 20, backlogFraction: 1)) == before)
        let d = advisor.observe(.init(endSeconds: 0.5, seconds: 0.5, guestByteCount: 0, wireByteCount: 0, backlogFraction: 0,
                                      samples: [.lz4: .init(inputByteCount: 0, outputByteCount: 0, cpuNanoseconds: 0)]))
        #expect(d.codec == nil)
        #expect(advisor.estimate(.lz4) == nil)
    }
}
