import FerryIO
import FerryMigration
import FerryWire
import Foundation

/// One measured migration.
public struct BenchRun: Codable, Sendable {
    public var mode: BenchMode
    public var iteration: Int
    public var succeeded: Bool
    public var error: String?
    /// From the command that started the migration to the VM running at b.
    public var totalSeconds: Double
    /// From QEMU's `migrate` to the destination having loaded everything.
    public var transferSeconds: Double
    /// Guest RAM bytes QEMU sent.
    public var ramBytes: UInt64
    public var throughputBitsPerSecond: Double
    /// Wire rate while the memory streams: a's NICs' bytes between 1% and 99% of the
    /// migration's traffic, over the time between (sampled every 50 ms). Leaves out
    /// QEMU's setup and the switchover, which are the same whatever carries the bytes.
    public var streamingBitsPerSecond: Double?
    public var qemuDowntimeMilliseconds: Double?
    /// The guest's pause: QEMU's STOP on a to its RESUME on b (QEMU's event timestamps,
    /// one clock in the lab).
    public var guestPauseMilliseconds: Double?
    /// Ferry only: where that pause went (the report's account).
    public var pause: MigrationReport.Pause?
    /// What the lab's client saw of the guest's network during the migration (`ferry
    /// probe`: UDP every 10 ms, one TCP connection); nil if the probe gave no result.
    public var network: NetworkProbe.Result? = nil
    /// The longest time between two guest heartbeats, by the host's clock.
    public var guestGapMilliseconds: Double
    public var guestOK: Bool
    /// Bytes sent by a's NICs during the migration (all traffic: payload, headers, resends).
    public var nicTxBytes: [String: UInt64]
    public var sourceQEMUCPUSeconds: Double?
    public var sourceFerryCPUSeconds: Double?
    public var destinationQEMUCPUSeconds: Double?
    public var destinationFerryCPUSeconds: Double?
    public var sourceFerryPeakRSSBytes: UInt64?
    public var destinationFerryPeakRSSBytes: UInt64?
    /// With a disk: its copy's bytes (Ferry: the NBD stream from the source; QEMU alone:
    /// the mirror's length) and the time from the copy's start to the mirror's catching up.
    public var diskBytes: UInt64? = nil
    /// Ferry only: where the destination's writers waited (the report's).
    public var destinationWaits: DestinationWaits? = nil
    public var diskCopySeconds: Double? = nil
    /// The guest's own disk writes while it migrated (its workload's count), MiB/s.
    public var guestDiskWriteMiBPerSecond: Double? = nil
    /// A guest that keeps writing its memory: its rate before the migration and while it
    /// migrated (its heartbeats' rewritten pages), MiB/s.
    public var guestWriteMiBPerSecondBefore: Double? = nil
    public var guestWriteMiBPerSecondDuring: Double? = nil
    /// Ferry only: its switch to postcopy, if it made one (the report's).
    public var postcopy: PostcopyAccount? = nil
    /// The slowest of those writes, ms (an active mirror makes each wait for the copy).
    public var guestSlowestDiskWriteMilliseconds: Double? = nil
    /// Ferry only: bytes per interface over time, and the report's events.
    public var timeline: [MigrationReport.Sample]
    public var events: [MigrationReport.Event]

    public var wireBytes: UInt64 { nicTxBytes.values.reduce(0, +) }
    var gib: Double { max(Double(ramBytes), 1) / Double(1 << 30) }
    public func perGiB(_ seconds: Double?) -> Double? { seconds.map { $0 / gib } }
}

/// What a scenario measured.
public struct BenchResult: Codable, Sendable {
    public var scenario: BenchScenario
    public var date: Date
    public var machine: String
    public var qemuVersion: String
    public var ferryVersion: String
    public var repeats: Int
    public var runs: [BenchRun]
}

/// Median and spread of a figure over the repeats.
struct Stat {
    var median: Double
    var low: Double
    var high: Double
    /// The 99th percentile by nearest rank (with fewer than 100 repeats, the highest).
    var p99: Double
    init?(_ values: [Double]) {
        guard !values.isEmpty else { return nil }
        let sorted = values.sorted()
        let mid = sorted.count / 2
        median = sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
        low = sorted.first!
        high = sorted.last!
        p99 = sorted[max(0, Int((0.99 * Double(sorted.count)).rounded(.up)) - 1)]
    }
}

extension BenchResult {
    func runs(_ mode: BenchMode) -> [BenchRun] { runs.filter { $0.mode == mode && $0.succeeded } }

    func stat(_ mode: BenchMode, _ value: (BenchRun) -> Double?) -> Stat? {
        Stat(runs(mode).compactMap(value))
    }

    public var modes: [BenchMode] { BenchMode.allCases.filter { m in runs.contains { $0.mode == m } } }

    /// The Markdown table, like the field report's, with a line of ratios under it.
    public var markdown: String {
        var out: [String] = []
        out.append("### \(scenario.name): \(scenario.summary)")
        out.append("")
        out.append("\(machine), QEMU \(qemuVersion), \(ferryVersion), \(ISO8601DateFormatter().string(from: date)); median of \(repeats) (min-max)")
        out.append("")
        out.append("| mode | throughput Gbit/s | of line rate | streaming Gbit/s | streaming of line rate | total s | QEMU downtime ms | guest gap ms | wire GiB | CPU s/GiB src QEMU | src Ferry | src all | dst QEMU | dst Ferry | dst all | Ferry peak RSS MiB | NIC split | ok |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for mode in modes {
            let all = runs.filter { $0.mode == mode }
            let ok = runs(mode)
            func f(_ s: Stat?, _ scale: Double = 1, _ digits: Int = 2) -> String {
                guard let s else { return "-" }
                let fmt = "%.\(digits)f"
                if repeats == 1 || s.low == s.high { return String(format: fmt, s.median * scale) }
                return String(format: "\(fmt) (\(fmt)-\(fmt))", s.median * scale, s.low * scale, s.high * scale)
            }
            let line = scenario.lineRateBitsPerSecond
            let split: String = {
                guard let first = ok.first, first.wireBytes > 0 else { return "-" }
                return first.nicTxBytes.sorted { $0.key < $1.key }
                    .map { "\($0.key) \(Int((Double($0.value) / Double(first.wireBytes) * 100).rounded()))%" }.joined(separator: ", ")
            }()
            let rss = stat(mode) { r in
                [r.sourceFerryPeakRSSBytes, r.destinationFerryPeakRSSBytes].compactMap { $0 }.max().map { Double($0) / 1048576 }
            }
            out.append("| \(mode.label) | \(f(stat(mode) { $0.throughputBitsPerSecond / 1e9 })) | "
                + (line.map { l in f(stat(mode) { $0.throughputBitsPerSecond / l }) } ?? "-") + " | "
                + "\(f(stat(mode) { $0.streamingBitsPerSecond.map { $0 / 1e9 } })) | "
                + (line.map { l in f(stat(mode) { $0.streamingBitsPerSecond.map { $0 / l } }) } ?? "-") + " | "
                + "\(f(stat(mode) { $0.totalSeconds }, 1, 1)) | \(f(stat(mode) { $0.qemuDowntimeMilliseconds }, 1, 0)) | "
                + "\(f(stat(mode) { $0.guestGapMilliseconds }, 1, 0)) | \(f(stat(mode) { Double($0.wireBytes) / Double(1 << 30) })) | "
                + "\(f(stat(mode) { $0.perGiB($0.sourceQEMUCPUSeconds) })) | \(f(stat(mode) { $0.perGiB($0.sourceFerryCPUSeconds) })) | "
                + "\(f(stat(mode) { $0.perGiB(Self.sum($0.sourceQEMUCPUSeconds, $0.sourceFerryCPUSeconds)) })) | "
                + "\(f(stat(mode) { $0.perGiB($0.destinationQEMUCPUSeconds) })) | \(f(stat(mode) { $0.perGiB($0.destinationFerryCPUSeconds) })) | "
                + "\(f(stat(mode) { $0.perGiB(Self.sum($0.destinationQEMUCPUSeconds, $0.destinationFerryCPUSeconds)) })) | "
                + "\(f(rss, 1, 0)) | \(split) | \(ok.count)/\(all.count) |")
        }
        let ratios = self.ratios
        if !ratios.isEmpty {
            out.append("")
            out.append("Ferry's median throughput against the others in this run: " + ratios.map { "\($0.0) \(String(format: "%.2f", $0.1))x" }.joined(separator: ", ") + ".")
        }
        out.append(contentsOf: pauseTable)
        out.append(contentsOf: networkTable)
        out.append(contentsOf: diskTable)
        out.append(contentsOf: convergenceTable)
        let failures = runs.filter { !$0.succeeded }
        if !failures.isEmpty {
            out.append("")
            out.append("Failed runs: " + failures.map { "\($0.mode.rawValue) #\($0.iteration + 1): \($0.error ?? "?")" }.joined(separator: "; "))
        }
        return out.joined(separator: "\n")
    }

    /// The guest's pause per mode (p50 and p99 over the repeats), each Ferry mode's
    /// account of it (the median of each part), and Ferry's against QEMU alone's.
    var pauseTable: [String] {
        let measured = modes.filter { stat($0, { $0.guestPauseMilliseconds }) != nil }
        guard !measured.isEmpty else { return [] }
        var out = ["", "Guest pause, QEMU's STOP on the source to RESUME on the destination (ms):", "",
                   "| mode | p50 | p99 | min | runs | where it went (medians, ms) |", "|---|---|---|---|---|---|"]
        for mode in measured {
            let s = stat(mode) { $0.guestPauseMilliseconds }!
            let names = runs(mode).first { $0.pause != nil }?.pause?.segments.map(\.name) ?? []
            let parts = names.compactMap { name -> String? in
                stat(mode) { $0.pause?.segments.first { $0.name == name }?.milliseconds }
                    .map { "\(name) \(String(format: "%.1f", $0.median))" }
            }
            out.append("| \(mode.label) | \(String(format: "%.0f", s.median)) | \(String(format: "%.0f", s.p99)) | "
                       + "\(String(format: "%.0f", s.low)) | \(runs(mode).filter { $0.guestPauseMilliseconds != nil }.count) | "
                       + (parts.isEmpty ? "-" : parts.joined(separator: ", ")) + " |")
        }
        // Each Ferry mode with defaults (one way and ping-pong) against each QEMU-alone mode.
        for ferryMode in [BenchMode.ferryMultichannel, .ferryPingPong] {
            guard let ferry = stat(ferryMode, { $0.guestPauseMilliseconds })?.median else { continue }
            let peers = measured.filter { !$0.isFerry }.compactMap { m in
                stat(m, { $0.guestPauseMilliseconds }).map { "\(m.rawValue) \(String(format: "%.2f", ferry / $0.median))x" }
            }
            if !peers.isEmpty {
                out.append("")
                out.append("\(ferryMode.rawValue): median guest pause against QEMU alone in this run: " + peers.joined(separator: ", ") + ".")
            }
        }
        let target = MigrationOptions(host: "", port: 0).downtimeLimit.seconds * 1000
        let over = runs.filter { $0.mode.isFerry && ($0.guestPauseMilliseconds ?? 0) > target }
        out.append("")
        out.append("Ferry runs whose guest pause exceeded the \(Int(target)) ms --downtime target: "
                   + (over.isEmpty ? "none" : over.map { "\($0.mode.rawValue) #\($0.iteration + 1) (\(Int($0.guestPauseMilliseconds!)) ms)" }.joined(separator: ", ")) + ".")
        return out
    }

    /// The guest's network as the lab's client saw it, per mode: the outage (p50 and
    /// worst), against the guest's pause in the same run, probes lost, TCP connections
    /// that broke.
    var networkTable: [String] {
        let measured = modes.filter { stat($0, { $0.network?.outageMilliseconds }) != nil }
        guard !measured.isEmpty else { return [] }
        var out = ["", "The guest's network, from the client (UDP probe every 10 ms, one TCP connection):", "",
                   "| mode | outage ms (p50) | outage ms (max) | outage minus guest pause ms (p50) | probes lost (p50) | TCP connections broken | runs |",
                   "|---|---|---|---|---|---|---|"]
        for mode in measured {
            let outage = stat(mode) { $0.network?.outageMilliseconds }!
            let over = stat(mode) { r in r.network.flatMap { n in r.guestPauseMilliseconds.map { n.outageMilliseconds - $0 } } }
            let lost = stat(mode) { $0.network.map { Double($0.lost) } }
            let probed = runs(mode).filter { $0.network != nil }
            let broken = probed.filter { !$0.network!.tcpConnected || $0.network!.tcpBroken != nil }.count
            out.append("| \(mode.label) | \(String(format: "%.0f", outage.median)) | \(String(format: "%.0f", outage.high)) | "
                       + "\(over.map { String(format: "%.0f", $0.median) } ?? "-") | \(lost.map { String(format: "%.0f", $0.median) } ?? "-") | "
                       + "\(broken) of \(probed.count) | \(probed.count) |")
        }
        return out
    }

    /// A guest that writes faster than the link: per mode, how many runs completed within
    /// the cap, the whole migration against one pass over the guest at the line rate, the
    /// write rate the guest kept, and the guest's pause.
    var convergenceTable: [String] {
        guard runs.contains(where: { $0.guestWriteMiBPerSecondBefore != nil }) else { return [] }
        let guestBytes = Double((scenario.fillMiB + 256 + scenario.fillMiB / 8) << 20)
        let pass = scenario.lineRateBitsPerSecond.map { guestBytes * 8 / $0 }
        var out = ["", "A guest writing faster than the link (cap \(scenario.capSeconds ?? 900) s"
                   + (pass.map { String(format: "; guest RAM at the line rate %.1f s", $0) } ?? "") + "):", "",
                   "| mode | completed | total s (p50) | of RAM/line rate | guest writes MiB/s before | during (p50) | kept | guest pause ms (p50) | postcopy page wait p99 ms |",
                   "|---|---|---|---|---|---|---|---|---|"]
        for mode in modes {
            let all = runs.filter { $0.mode == mode }
            let ok = runs(mode)
            let total = stat(mode) { $0.totalSeconds }
            let before = Stat(all.compactMap(\.guestWriteMiBPerSecondBefore))
            // Over every run, completed or not: a guest slowed in vain was slowed all the same.
            let during = Stat(all.compactMap(\.guestWriteMiBPerSecondDuring))
            let kept = Stat(all.compactMap { r in r.guestWriteMiBPerSecondBefore.flatMap { b in r.guestWriteMiBPerSecondDuring.map { $0 / max(b, 0.001) } } })
            let pause = stat(mode) { $0.guestPauseMilliseconds }
            let wait = stat(mode) { $0.postcopy?.latencyP99Milliseconds }
            out.append("| \(mode.label) | \(ok.count)/\(all.count) | \(total.map { String(format: "%.1f", $0.median) } ?? "-") | "
                       + "\(zip2(total, pass).map { String(format: "%.2f", $0.0.median / $0.1) } ?? "-") | "
                       + "\(before.map { String(format: "%.1f", $0.median) } ?? "-") | \(during.map { String(format: "%.1f", $0.median) } ?? "-") | "
                       + "\(kept.map { String(format: "%.2f", $0.median) } ?? "-") | \(pause.map { String(format: "%.0f", $0.median) } ?? "-") | "
                       + "\(wait.map { String(format: "%.1f", $0.median) } ?? "-") |")
        }
        return out
    }

    /// With a disk: how fast each mode copied it until the mirror caught up (median).
    var diskTable: [String] {
        guard scenario.diskMiB > 0 else { return [] }
        let measured = modes.filter { stat($0, { $0.diskCopySeconds }) != nil }
        guard !measured.isEmpty else { return [] }
        var out = ["", "Disk copy (\(scenario.diskMiB) MiB of data, until the mirror caught up):", "",
                   "| mode | copy time s (p50) | data rate Gbit/s (p50) | of line rate | whole migration s (p50) | guest's disk writes MiB/s (p50, asked \(scenario.diskWriteRate)) | slowest write ms (p50) | runs |",
                   "|---|---|---|---|---|---|---|---|"]
        for mode in measured {
            let t = stat(mode) { $0.diskCopySeconds }!
            // The data on the disk over the time (the same for every mode: a mirror's own
            // count includes the zeros it skipped).
            let data = Double(scenario.diskMiB << 20)
            let rate = stat(mode) { r in r.diskCopySeconds.map { data * 8 / max($0, 0.001) / 1e9 } }
            let total = stat(mode) { $0.totalSeconds }
            let line = scenario.lineRateBitsPerSecond.flatMap { l in rate.map { String(format: "%.2f", $0.median * 1e9 / l) } } ?? "-"
            let writes = stat(mode) { $0.guestDiskWriteMiBPerSecond }
            // Issue 14's bound on the whole migration: (disk data + RAM) at the line rate, + 3 s.
            let bound = scenario.lineRateBitsPerSecond.flatMap { l in
                stat(mode) { Double($0.ramBytes) }.map { (data + $0.median) * 8 / l + 3 }
            }
            out.append("| \(mode.label) | \(String(format: "%.2f", t.median)) | \(rate.map { String(format: "%.2f", $0.median) } ?? "-") | \(line) | "
                       + "\(total.map { String(format: "%.1f", $0.median) } ?? "-")\(bound.map { String(format: " (bound %.1f)", $0) } ?? "") | \(writes.map { String(format: "%.1f", $0.median) } ?? "-") | "
                       + "\(stat(mode) { $0.guestSlowestDiskWriteMilliseconds }.map { String(format: "%.0f", $0.median) } ?? "-") | "
                       + "\(runs(mode).filter { $0.diskCopySeconds != nil }.count) |")
        }
        return out
    }

    /// A side's whole CPU (QEMU, plus Ferry where it carried the migration): what each mode
    /// costs the host, peers and Ferry alike. nil if QEMU's figure is missing.
    static func sum(_ qemu: Double?, _ ferry: Double?) -> Double? {
        qemu.map { $0 + (ferry ?? 0) }
    }

    /// Ferry (defaults) over each other mode and over the line rate, by median throughput.
    public var ratios: [(String, Double)] {
        guard let ferry = stat(.ferryMultichannel, { $0.throughputBitsPerSecond })?.median else { return [] }
        var out: [(String, Double)] = []
        if let line = scenario.lineRateBitsPerSecond { out.append(("line rate", ferry / line)) }
        for mode in modes where mode != .ferryMultichannel {
            if let other = stat(mode, { $0.throughputBitsPerSecond })?.median, other > 0 { out.append((mode.rawValue, ferry / other)) }
        }
        return out
    }

    public var json: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return String(decoding: (try? encoder.encode(self)) ?? Data(), as: UTF8.self)
    }

    /// Throughput per NIC over time for each Ferry mode (its first successful run), with
    /// the report's events (failover, NICs coming back) as marks.
    public var svg: String {
        let ferryRuns = modes.filter(\.isFerry).compactMap { m in runs(m).first }
        let width = 760.0, panelHeight = 200.0, left = 60.0, top = 40.0
        let height = top + Double(max(ferryRuns.count, 1)) * (panelHeight + 50) + 10
        var out = ["<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" font-family=\"sans-serif\" font-size=\"12\">",
                   "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>",
                   "<text x=\"\(left)\" y=\"20\" font-size=\"14\">\(scenario.name): throughput per NIC over time (\(scenario.summary))</text>"]
        let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
        for (index, run) in ferryRuns.enumerated() {
            let y0 = top + Double(index) * (panelHeight + 50)
            // Rates between samples.
            var series: [String: [(Double, Double)]] = [:]
            for (a, b) in zip(run.timeline, run.timeline.dropFirst()) where b.at > a.at {
                for (nic, bytes) in b.interfaceBytes {
                    let before = a.interfaceBytes[nic] ?? 0
                    series[nic, default: []].append((b.at, Double(bytes &- min(before, bytes)) * 8 / (b.at - a.at)))
                }
            }
            let tMax = max(run.timeline.last?.at ?? 1, 1)
            let rMax = max(series.values.flatMap { $0.map(\.1) }.max() ?? 1, scenario.nicBitsPerSecond ?? 0) * 1.1
            func x(_ t: Double) -> Double { left + t / tMax * (width - left - 20) }
            func y(_ r: Double) -> Double { y0 + panelHeight - r / rMax * panelHeight }
            out.append("<text x=\"\(left)\" y=\"\(y0 - 6)\">\(run.mode.label), run \(run.iteration + 1)</text>")
            out.append("<rect x=\"\(left)\" y=\"\(y0)\" width=\"\(width - left - 20)\" height=\"\(panelHeight)\" fill=\"none\" stroke=\"#999\"/>")
            for frac in [0.0, 0.5, 1.0] {
                let r = rMax * frac
                out.append("<text x=\"4\" y=\"\(y(r) + 4)\">\(String(format: "%.2f", r / 1e9)) Gb/s</text>")
            }
            out.append("<text x=\"\(width - 60)\" y=\"\(y0 + panelHeight + 16)\">\(String(format: "%.1f", tMax)) s</text>")
            for event in run.events where event.what.contains("lost carrier") || event.what.contains("is back") || (event.what.contains("channel") && event.what.contains("failed")) {
                out.append("<line x1=\"\(x(event.at))\" y1=\"\(y0)\" x2=\"\(x(event.at))\" y2=\"\(y0 + panelHeight)\" stroke=\"#aaa\" stroke-dasharray=\"4 3\"><title>\(event.what)</title></line>")
            }
            // Compression switches: a green line, labelled with the codec from then on.
            for event in run.events where event.what.hasPrefix("compression: ") {
                let codec = event.what.dropFirst("compression: ".count).split(separator: " ").first.map(String.init) ?? "?"
                out.append("<line x1=\"\(x(event.at))\" y1=\"\(y0)\" x2=\"\(x(event.at))\" y2=\"\(y0 + panelHeight)\" stroke=\"#2ca02c\" stroke-dasharray=\"1 3\"><title>\(Self.escape(event.what))</title></line>")
                out.append("<text x=\"\(x(event.at) + 3)\" y=\"\(y0 + 14)\" fill=\"#2ca02c\">\(Self.escape(codec))</text>")
            }
            for (i, nic) in series.keys.sorted().enumerated() {
                let points = series[nic]!.map { "\(String(format: "%.1f", x($0.0))),\(String(format: "%.1f", y($0.1)))" }.joined(separator: " ")
                let color = colors[i % colors.count]
                out.append("<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"1.5\" points=\"\(points)\"/>")
                out.append("<text x=\"\(width - 150 + Double(i) * 60)\" y=\"\(y0 - 6)\" fill=\"\(color)\">\(nic)</text>")
            }
        }
        out.append("</svg>")
        return out.joined(separator: "\n")
    }

    /// Text for SVG: the reasons of events hold "<" and "&" at times.
    static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}


private func zip2<A, B>(_ a: A?, _ b: B?) -> (A, B)? {
    guard let a, let b else { return nil }
    return (a, b)
}
