import FerryIO
import FerryWire
import Foundation

/// What `ferry migrate` prints at the end: one per migration, success or not.
public struct MigrationReport: Codable, Sendable {
    public enum Outcome: String, Codable, Sendable {
        /// The VM runs on the destination; the source QEMU is stopped.
        case succeeded
        /// The VM still runs on the source; nothing changed on the destination.
        case failedVMOnSource = "failed-vm-on-source"
        /// The outcome is not known (the destination vanished after the commit was sent):
        /// the source keeps its copy paused; see the message.
        case uncertain
        /// The VM's QEMU died on the source before the commit: no copy of it runs anywhere
        /// (the destination discarded its incomplete one).
        case vmDied = "failed-vm-died"
        /// The operator cancelled it (`--cancel`, Ctrl-C) before the commit point: the VM
        /// still runs on the source, the destination discarded its copy.
        case cancelled
    }

    public struct Side: Codable, Sendable {
        public var host: String
        public var ferryCPUSeconds: Double?
        public var qemuCPUSeconds: Double?
        public var ferryPeakRSSBytes: UInt64?
    }

    public struct Channel: Codable, Sendable {
        public var channel: Int
        public var interface: String
        public var payloadBytes: UInt64
        public var alive: Bool
    }

    public struct NIC: Codable, Sendable {
        public var interface: String
        public var localAddress: String
        public var remoteAddress: String
        public var speedBitsPerSecond: UInt64?
    }

    /// Bytes sent per interface so far, sampled a few times a second.
    public struct Sample: Codable, Sendable {
        public var at: Double
        public var interfaceBytes: [String: UInt64]
    }

    public struct Event: Codable, Sendable {
        /// Seconds since the migration started.
        public var at: Double
        public var what: String
    }

    public var vm: String
    public var outcome: Outcome
    public var error: String?
    public var failedPhase: String?
    public var startedAt: Date
    public var totalSeconds: Double
    /// From QEMU's `migrate` to QEMU's completion on the source.
    public var transferSeconds: Double?
    /// QEMU's own downtime figure (the source's stop-and-copy time).
    public var qemuDowntimeMilliseconds: Double?
    /// From the source's STOP to the destination's confirmation that the VM runs:
    /// an upper bound on how long the guest was paused.
    public var switchoverMilliseconds: Double?
    /// Guest RAM bytes QEMU sent (its `ram.transferred`).
    public var qemuTransferredBytes: UInt64?
    /// Bytes of QEMU's streams that Ferry carried (what QEMU wrote into Ferry's sockets).
    public var streamBytes: UInt64
    /// Bytes Ferry put on the data channels (streams, framing, resends).
    public var wireBytes: UInt64
    public var retransmittedBytes: UInt64
    /// streamBytes over transferSeconds.
    public var throughputBitsPerSecond: Double?
    public var multifdChannels: Int
    public var channels: [Channel]
    public var nics: [NIC]
    public var events: [Event]
    public var timeline: [Sample]
    public var source: Side
    public var destination: Side
    /// How the migration was protected (cipher and key id, or insecure); nil if it ended
    /// before the handshake.
    public var security: String? = nil
    /// How chunks went through Ferry (zero-copy or copied), nil if it ended before.
    public var dataPath: String? = nil
    /// The codec used over time (nil if the migration ended before its data path started).
    public var compression: Compression? = nil
    /// How the VM moved when it was not a network migration: a same-host update says so
    /// here (nil: over the network, through Ferry's data channels).
    public var mode: String? = nil
    /// Seconds the migration waited in line (for an outgoing slot here, or at the
    /// destination's `--max-migrations`); nil if it never waited.
    public var queuedSeconds: Double? = nil
    /// Where it waited and its place on arrival, e.g. "12.3 s at the destination
    /// (position 1 of 2 on arrival)".
    public var queued: String? = nil
    /// The guest's pause, STOP on the source to RESUME on the destination, and where it
    /// went (nil when the migration did not complete, or the destination sent no times).
    public var pause: Pause? = nil
    /// The VM's disks: where each is on both hosts, and what its copy carried.
    public var disks: [Disk]? = nil
    /// Where the destination's stream writers waited (a late chunk holding later ones
    /// back; the destination QEMU slow to take its stream).
    public var destinationWaits: DestinationWaits? = nil
    /// The guest's NICs and when the destination put them on its network (nil: no NICs).
    public var guestNICs: GuestNICReport? = nil
    /// What `--probe` saw of the guest's network during the migration (nil: no probe).
    public var network: NetworkProbe.Result? = nil
    /// How the migration was made to converge: the vCPU throttle over time (nil: `--converge none`).
    public var convergence: ConvergenceAccount? = nil
    /// The switch to postcopy, if the migration made it.
    public var postcopy: PostcopyAccount? = nil
    /// A libvirt domain's migration (`ferry migrate --libvirt`): what libvirt was asked,
    /// and which of its connections Ferry carried.
    public var libvirt: LibvirtAccount? = nil

    public struct LibvirtAccount: Codable, Sendable, Equatable {
        public var domain: String
        /// The local libvirtd's URI.
        public var uri: String
        public var copyStorage: Bool
        public var parallelConnections: Int?
        public var persistent: Bool
        public var undefineSource: Bool
        /// The connections Ferry carried, by kind ("libvirtd 1, migration 3, disks 1").
        public var connections: String
        /// Guest memory libvirt reported sent, and disk bytes copied.
        public var memoryBytes: UInt64?
        public var diskBytes: UInt64?

        public var summary: String {
            var flags = ["live", "peer to peer"]
            if copyStorage { flags.append("copy storage") }
            if let parallelConnections { flags.append("\(parallelConnections) parallel connections") }
            if persistent { flags.append("persistent") }
            if undefineSource { flags.append("undefine source") }
            var line = "domain \(domain) from \(uri) (" + flags.joined(separator: ", ") + ")"
            if !connections.isEmpty { line += "; carried " + connections }
            if let diskBytes, diskBytes > 0 { line += "; disks \(Format.bytes(diskBytes)) copied" }
            return line
        }
    }

    public struct GuestNICReport: Codable, Sendable, Equatable {
        /// "eth0 52:54:00:12:34:56 on ferrybr0", one per NIC.
        public var nics: [String]
        /// From the taps joining their bridges to the guest's RESUME on the destination.
        public var connectedBeforeResumeMilliseconds: Double?
        /// From the guest's RESUME to `announce-self` done.
        public var announcedAfterResumeMilliseconds: Double?
        /// The destination could not put the NICs on its network, or not announce them: why.
        public var problem: String?
        public init(nics: [String], connectedBeforeResumeMilliseconds: Double? = nil, announcedAfterResumeMilliseconds: Double? = nil,
                    problem: String? = nil) {
            self.problem = problem
            self.nics = nics
            self.connectedBeforeResumeMilliseconds = connectedBeforeResumeMilliseconds
            self.announcedAfterResumeMilliseconds = announcedAfterResumeMilliseconds
        }
    }

    public struct Disk: Codable, Sendable, Equatable {
        /// The guest's name (vda, vdb, ...).
        public var name: String
        public var format: String
        public var virtualSizeBytes: UInt64
        public var shared: Bool
        public var sourcePath: String
        public var destinationPath: String?
        /// Bytes of its copy's NBD traffic from the source (writes with their data, and
        /// requests), nil for a shared disk.
        public var copiedBytes: UInt64?
        /// From the copy's start to every disk caught up.
        public var copySeconds: Double?
        /// The tightest limit Ferry put on the guest's writes to the disk for its copy to
        /// converge (bytes per second), nil if it needed none.
        public var writeLimitBytesPerSecond: UInt64? = nil
        /// After a success: the source's image, which Ferry leaves as it was (the VM no
        /// longer uses it; the operator removes it). nil for a shared disk.
        public var staleSourceImage: String?
    }

    public struct Pause: Codable, Sendable, Equatable {
        public var guestPauseMilliseconds: Double
        /// The destination's clock minus the source's, as the commit's round trip shows it.
        public var clockOffsetMilliseconds: Double
        /// In order; they add up to the pause.
        public var segments: [Segment]
        public struct Segment: Codable, Sendable, Equatable {
            public var name: String
            public var milliseconds: Double
        }
    }

    public struct Compression: Codable, Sendable, Equatable {
        /// `--compress` as given: auto, none, lz4, zstd:N.
        public var mode: String
        public var periods: [Period]
        public struct Period: Codable, Sendable, Equatable {
            public var codec: String
            public var fromSeconds: Double
            public var toSeconds: Double
        }
    }

    public var succeeded: Bool { outcome == .succeeded }
}

extension MigrationReport {
    /// The event a data channel's failure leaves (its chunks go again on the others).
    static func channelFailedEvent(channel: Int, interface: String, reason: String, requeuedChunks: Int) -> String {
        "channel \(channel) on \(interface) failed (\(reason)); \(requeuedChunks) chunk(s) sent again on the others"
    }

    /// Data channels that failed during the migration, their chunks sent on the others.
    public var channelsFailedOver: Int {
        events.filter { $0.what.hasPrefix("channel ") && $0.what.hasSuffix(" sent again on the others") }.count
    }

    /// Data channel payload per NIC (what the report's per-NIC lines show).
    public var payloadBytesByInterface: [String: UInt64] {
        channels.reduce(into: [:]) { $0[$1.interface, default: 0] += $1.payloadBytes }
    }

    /// The report's compression ratio: channel payload over wire bytes (nil before the
    /// data path started or when nothing went on the wire).
    public var compressionRatio: Double? {
        let payload = channels.reduce(0) { $0 + $1.payloadBytes }
        guard compression != nil, wireBytes > 0, payload > 0 else { return nil }
        return Double(payload) / Double(wireBytes)
    }

    /// The guest's pause at the switchover, the best figure there is: STOP to RESUME,
    /// else Ferry's upper bound, else QEMU's own.
    public var downtimeMilliseconds: Double? {
        pause?.guestPauseMilliseconds ?? switchoverMilliseconds ?? qemuDowntimeMilliseconds
    }
}

extension MigrationReport {
    /// The report as an operator reads it.
    public var text: String {
        var lines: [String] = []
        let status: String
        switch outcome {
        case .succeeded: status = "SUCCEEDED: \(vm) now runs on \(destination.host)"
        case .failedVMOnSource: status = "FAILED: \(vm) keeps running on \(source.host)"
        case .uncertain: status = "UNCERTAIN: \(vm) is paused on \(source.host); check \(destination.host)"
        case .vmDied: status = "FAILED: the QEMU of \(vm) died on \(source.host); no copy of it runs"
        case .cancelled: status = "CANCELLED by the operator: \(vm) keeps running on \(source.host)"
        }
        lines.append((mode == nil ? "Migration" : "Update") + " of \(vm): \(source.host) -> \(destination.host)")
        lines.append("  result         \(status)")
        if let error { lines.append("  error          \(error)" + (failedPhase.map { " (during \($0))" } ?? "")) }
        lines.append("  total time     \(Format.seconds(totalSeconds))")
        if let queued { lines.append("  queued         \(queued)") }
        if let t = transferSeconds { lines.append("  transfer       \(Format.seconds(t))") }
        var downtime: [String] = []
        if let d = qemuDowntimeMilliseconds { downtime.append("QEMU \(Format.millis(d))") }
        if let s = switchoverMilliseconds { downtime.append("guest paused <= \(Format.millis(s))") }
        if let pause {
            downtime.append("guest paused \(Format.millis(pause.guestPauseMilliseconds)) (STOP to RESUME)")
        }
        if !downtime.isEmpty { lines.append("  downtime       " + downtime.joined(separator: ", ")) }
        if let w = destinationWaits, w.lateChunkLongestMilliseconds >= 50 || w.qemuLongestMilliseconds >= 50 {
            lines.append(String(format: "  dest waits     for a late chunk %.0f ms at most (%.0f ms in all), for its QEMU %.0f ms at most (%.0f ms in all)",
                                w.lateChunkLongestMilliseconds, w.lateChunkTotalMilliseconds, w.qemuLongestMilliseconds, w.qemuTotalMilliseconds))
        }
        if let pause {
            lines.append("  pause          " + pause.segments.map { "\($0.name) \(String(format: "%.1f", $0.milliseconds))" }.joined(separator: ", ") + " ms")
        }
        if let g = guestNICs {
            var line = g.nics.joined(separator: "; ")
            if let before = g.connectedBeforeResumeMilliseconds, let after = g.announcedAfterResumeMilliseconds {
                line += String(format: " (on the destination's bridge %.1f ms before the guest resumed, announced %.1f ms after)", before, after)
            }
            if let problem = g.problem { line += "; BUT on the destination: \(problem)" }
            lines.append("  guest NICs     " + line)
        }
        if let network { lines.append("  network        " + network.summary) }
        if let convergence { lines.append("  convergence    " + convergence.summary) }
        if let postcopy { lines.append("  postcopy       " + postcopy.summary) }
        if let libvirt { lines.append("  libvirt        " + libvirt.summary) }
        if let mode { lines.append("  mode           " + mode) }
        let copied = (disks ?? []).contains { $0.copiedBytes != nil }
        var moved = "\(Format.bytes(streamBytes)) of QEMU streams\(copied ? " and disk copies" : ""), \(Format.bytes(wireBytes)) on the wire"
        if mode != nil { moved = "\(Format.bytes(streamBytes)) of QEMU stream, QEMU to QEMU over a Unix socket" }
        if retransmittedBytes > 0 { moved += ", \(Format.bytes(retransmittedBytes)) sent again" }
        lines.append("  moved          " + moved)
        if let compression {
            let guest = channels.reduce(0) { $0 + $1.payloadBytes }
            var line = "\(compression.mode): " + compression.periods.filter { $0.toSeconds > $0.fromSeconds || compression.periods.count == 1 }
                .map { "\($0.codec) \(String(format: "%.1f-%.1f s", $0.fromSeconds, $0.toSeconds))" }.joined(separator: ", ")
            if wireBytes > 0 && guest > 0 {
                line += String(format: "; guest %@ in %@ on the wire (ratio %.2f)", Format.bytes(guest), Format.bytes(wireBytes), Double(guest) / Double(wireBytes))
            }
            lines.append("  compression    " + line)
        }
        if let bps = throughputBitsPerSecond { lines.append("  throughput     \(Format.rate(bps))") }
        for disk in disks ?? [] {
            var line = "  disk \(disk.name.padding(toLength: 9, withPad: " ", startingAt: 0)) \(disk.format), \(Format.bytes(disk.virtualSizeBytes)): "
            if disk.shared {
                line += "shared, \(disk.sourcePath) on both hosts, not copied"
            } else {
                line += "\(disk.sourcePath) -> \(destination.host):\(disk.destinationPath ?? "?")"
                if let bytes = disk.copiedBytes {
                    line += ", \(Format.bytes(bytes)) copied"
                    if let t = disk.copySeconds { line += " (all disks caught up in \(Format.seconds(t)))" }
                }
                if let limit = disk.writeLimitBytesPerSecond {
                    line += "; the guest's writes limited to \(Format.bytes(limit))/s for the copy to converge"
                }
            }
            lines.append(line)
            if let stale = disk.staleSourceImage {
                lines.append("                 left on \(source.host), no longer used: \(stale) (remove it when you no longer need it)")
            }
        }
        if let security { lines.append("  security       \(security)") }
        if let dataPath { lines.append("  data path      \(dataPath)") }
        if libvirt != nil {
            lines.append("  streams        libvirt's connections, over \(channels.count) data channel(s) on \(nics.count) NIC(s)")
        } else if mode == nil {
            lines.append("  streams        " + (postcopy != nil ? "main (with QEMU's return path) + preempt" : "main + \(multifdChannels) multifd") + ", over \(channels.count) data channel(s) on \(nics.count) NIC(s)")
        }
        for nic in Dictionary(grouping: channels, by: \.interface).sorted(by: { $0.key < $1.key }) {
            let bytes = nic.value.reduce(0) { $0 + $1.payloadBytes }
            let share = wireBytes > 0 ? Double(bytes) / Double(max(1, channels.reduce(0) { $0 + $1.payloadBytes })) * 100 : 0
            let perRate = transferSeconds.map { " at \(Format.rate(Double(bytes) * 8 / max($0, 0.001)))" } ?? ""
            lines.append("    \(nic.key.padding(toLength: 12, withPad: " ", startingAt: 0)) \(Format.bytes(bytes)) (\(String(format: "%.0f", share))%)\(perRate), \(nic.value.count) channel(s)")
        }
        func cpu(_ side: Side) -> String {
            let f = side.ferryCPUSeconds.map { String(format: "%.2f s", $0) } ?? "?"
            let q = side.qemuCPUSeconds.map { String(format: "%.2f s", $0) } ?? "?"
            let rss = side.ferryPeakRSSBytes.map { ", Ferry peak RSS \(Format.bytes($0))" } ?? ""
            return "Ferry \(f), QEMU \(q)\(rss)"
        }
        if mode != nil {
            let f = { (v: Double?) in v.map { String(format: "%.2f s", $0) } ?? "?" }
            lines.append("  CPU            Ferry \(f(source.ferryCPUSeconds)), old QEMU \(f(source.qemuCPUSeconds)), new QEMU \(f(destination.qemuCPUSeconds))")
        } else {
            lines.append("  CPU source     " + cpu(source))
            lines.append("  CPU dest       " + cpu(destination))
        }
        if !events.isEmpty {
            lines.append("  events")
            for e in events { lines.append("    +\(String(format: "%7.3f", e.at)) s  \(e.what)") }
        }
        return lines.joined(separator: "\n")
    }

    public var json: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return String(decoding: (try? encoder.encode(self)) ?? Data(), as: UTF8.self)
    }
}

/// Human formats for bytes, rates and times.
public enum Format {
    public static func bytes(_ n: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(n)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(n) B" : String(format: "%.1f %@", value, units[unit])
    }

    public static func rate(_ bitsPerSecond: Double) -> String {
        if bitsPerSecond >= 1e9 { return String(format: "%.2f Gbit/s", bitsPerSecond / 1e9) }
        if bitsPerSecond >= 1e6 { return String(format: "%.1f Mbit/s", bitsPerSecond / 1e6) }
        return String(format: "%.0f kbit/s", bitsPerSecond / 1e3)
    }

    public static func seconds(_ s: Double) -> String { String(format: "%.2f s", s) }
    public static func millis(_ ms: Double) -> String { String(format: "%.0f ms", ms) }
}
