import CFerryLinux
import ArgumentParser
import FerryCompress
import FerryIO
import FerryInterfaces
import FerryMetrics
import FerryMigration
import FerryQMP
import FerryVM
import FerryWire
import Foundation

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Live-migrate a VM of this host to another host running `ferry serve`.",
        discussion: """
            The VM keeps running here until the destination has all of it; if anything fails
            before the switchover it stays here. --to localhost (127.0.0.1, ::1) is a same-host
            update instead (`ferry vm update`): RAM stays in place, only device state moves. Exit status: 0 migrated, 1 failed (the VM runs
            here), 3 uncertain (the VM is paused here; see the report), 4 cancelled by the operator (the VM runs here).

            At most 2 migrations leave this host at once (FERRY_MAX_OUTGOING_MIGRATIONS to change it); more wait in line, as
            they do at a destination past its `ferry serve --max-migrations`. Ctrl-C, SIGTERM or `ferry migrate --cancel NAME`
            (from any shell on this host) cancel a migration until its commit point: QEMU's migration is cancelled, the VM keeps
            running here and the destination discards its copy. After the commit point it is too late, and the migration
            completes. `--cancel` exits 0 when the VM stayed here, 1 when there was nothing to cancel or it was too late.

            With --postcopy allowed the VM may run at the destination before all its memory is there (--converge postcopy
            or auto, or `ferry migrate --postcopy-now NAME` from any shell on this host). From the switch on no stop is
            granted, and until the last page is there the VM needs both hosts.
            """)

    @Argument(help: "The VM to migrate.")
    var name: String

    @Option(help: "The destination, HOST[:PORT] (default port \(Endpoint.defaultPort)); a name with several addresses (one per NIC of the destination) is tried address by address.")
    var to: Endpoint?

    @Flag(help: "Cancel the migration of NAME that a `ferry migrate` on this host is running, and wait until it has rolled back.")
    var cancel = false

    @Flag(name: .customLong("postcopy-now"), help: "Switch the running migration of NAME (started with --postcopy allowed) to postcopy now: the VM runs at the destination and faults in the rest of its memory.")
    var postcopyNow = false

    @OptionGroup var libvirtOptions: LibvirtOptions

    @OptionGroup var tuning: TuningOptions

    @OptionGroup var cpuOptions: CPUOptions

    @OptionGroup var nicOptions: NICOptions

    @Option(help: "Probe the guest's echo service at ADDRESS[:PORT] (UDP every 10 ms and a TCP connection, port 7 by default) from this host while it moves; the report says how many probes were lost and how long the guest could not be reached.")
    var probe: String?

    @OptionGroup var output: ReportOptions

    @Option(name: .customLong("progress-file"), help: "Append progress as JSON lines to this file, a few times a second (for automation).")
    var progressFile: String?

    @OptionGroup var security: SecurityOptions

    @OptionGroup var host: HostOptions

    func validate() throws {
        try libvirtOptions.validate(name: name)
        if !libvirtOptions.libvirt, let problem = VMSpec.validateName(name) { throw ValidationError(problem) }
        if cancel && postcopyNow { throw ValidationError("--cancel and --postcopy-now cannot go together") }
        if (cancel || postcopyNow) && to != nil {
            throw ValidationError("--\(cancel ? "cancel" : "postcopy-now") acts on a running migration: give the VM's name, not --to")
        }
        if !cancel && !postcopyNow && to == nil { throw ValidationError("Missing expected argument '--to <to>'") }
        if let probe, probeOptions(probe) == nil { throw ValidationError("--probe: '\(probe)' is not IPV4-ADDRESS[:PORT]") }
    }

    /// `--probe ADDRESS[:PORT]`.
    func probeOptions(_ text: String) -> NetworkProbe.Options? {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count <= 2, IPv4Check.isAddress(parts[0]) else { return nil }
        var options = NetworkProbe.Options(host: parts[0])
        if parts.count == 2 {
            guard let port = UInt16(parts[1]), port > 0 else { return nil }
            options.port = port
        }
        return options
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        if cancel {
            if libvirtOptions.libvirt { return try CancelMigration.runLibvirt(domain: name, store: host.store, uri: libvirtOptions.uri) }
            return try CancelMigration.run(name: name, store: host.store)
        }
        if postcopyNow {
            return try PostcopyNow.run(name: name, store: host.store)
        }
        guard let to else { throw ValidationError("Missing expected argument '--to <to>'") }
        if to.isThisHost && libvirtOptions.libvirt {
            throw ValidationError("--libvirt migrates to another host; for this host's libvirt use virsh")
        }
        if to.isThisHost {
            // Same host: a new QEMU takes the VM over with its RAM in place; no daemon,
            // no key, no data channels (`ferry vm update`).
            try UpdateArguments.perform(name: name, qemu: nil, host: host, timeout: tuning.timeout.duration, downtime: tuning.downtime.duration,
                                        output: output, progressFile: progressFile)
            return
        }
        // Zero-copy chunks hold a pipe (two descriptors) each, a window's worth of them.
        _ = ferry_raise_nofile_limit()
        let keys = try security.keys(for: "migrate")
        let logger = host.logger("ferry.migrate")
        var options = try tuning.options(host: to.host, port: to.port, keys: keys, nics: nicOptions, cpus: cpuOptions)
        options.probe = probe.flatMap(probeOptions)
        let display = ProgressDisplay(enabled: !output.quiet, jsonPath: progressFile)
        let metrics = MetricsReporter(paths: host.paths)
        let migration = SourceMigration(store: host.store, name: name, options: options, logger: logger) { [name] progress in
            display.show(progress)
            metrics.progress(vm: name, channels: progress.channels)
        }
        let signals = StopSignals(name: name, migration: migration)
        metrics.started(vm: name, role: .source)
        let report = libvirtOptions.libvirt ? migration.runLibvirt(libvirtOptions.request(domain: name)) : migration.run()
        metrics.ended(report: report, role: .source)
        signals.release()
        display.finish()
        try output.deliver(report)
    }
}


/// `ferry migrate DOMAIN --libvirt ...`: a libvirt domain, migrated by libvirt over Ferry.
struct LibvirtOptions: ParsableArguments {
    @Flag(help: "NAME is a libvirt domain: libvirt migrates it peer to peer (live) and keeps the switchover, Ferry carries its connections (control, memory streams, disk copies) over its data channels. The destination's ferry serve connects them to its libvirtd (--libvirt-socket there).")
    var libvirt = false

    @Option(name: .customLong("libvirt-uri"), help: "The local libvirtd (default: \(LibvirtRequest.defaultURI)).")
    var libvirtURI: String?

    @Flag(name: .customLong("copy-storage"), help: "With --libvirt: copy every disk that is not shared (libvirt's --copy-storage-all); the destination needs the same storage paths.")
    var copyStorage = false

    @Option(help: "With --libvirt: QEMU's parallel migration connections (libvirt's --parallel --parallel-connections N).")
    var parallel: Int?

    @Flag(help: "With --libvirt: define the domain on the destination too (libvirt's --persistent).")
    var persistent = false

    @Flag(name: .customLong("undefine-source"), help: "With --libvirt: undefine the domain on this host once it runs there (libvirt's --undefine-source).")
    var undefineSource = false

    @Flag(help: "With --libvirt: migrate even where libvirt cannot tell that a disk not copied is on shared storage (libvirt's --unsafe).")
    var unsafe = false

    var uri: String { libvirtURI ?? LibvirtRequest.defaultURI }

    func validate(name: String) throws {
        let needs = [("--libvirt-uri", libvirtURI != nil), ("--copy-storage", copyStorage), ("--parallel", parallel != nil),
                     ("--persistent", persistent), ("--undefine-source", undefineSource), ("--unsafe", unsafe)].filter(\.1).map(\.0)
        if !libvirt, let first = needs.first { throw ValidationError("\(first) goes with --libvirt (a libvirt domain)") }
        if let parallel, !(1...64).contains(parallel) { throw ValidationError("--parallel must be between 1 and 64, not \(parallel)") }
        if libvirt && (name.isEmpty || name.contains("/")) { throw ValidationError("'\(name)' is not a libvirt domain's name") }
    }

    func request(domain: String) -> LibvirtRequest {
        var r = LibvirtRequest(domain: domain)
        r.uri = uri
        r.copyStorage = copyStorage
        r.parallelConnections = parallel
        r.persistent = persistent
        r.undefineSource = undefineSource
        r.unsafe = unsafe
        return r
    }
}

/// The progress bar: one line redrawn on a terminal, a line a second otherwise (stderr).
/// The migration calls `show` from its threads, the command `finish`: each under `lock`.
// `lastLine`, `drew` and the writes to `json` and stderr are under `lock`; the rest is immutable.
final class ProgressDisplay: @unchecked Sendable {
    private let enabled: Bool
    private let tty = isatty(STDERR_FILENO) == 1
    private var lastLine = 0.0
    private var drew = false
    private let lock = Monitor()
    private let json: FileHandle?

    init(enabled: Bool, jsonPath: String? = nil) {
        self.enabled = enabled
        if let jsonPath {
            _ = FileManager.default.createFile(atPath: jsonPath, contents: nil)
            json = FileHandle(forWritingAtPath: jsonPath)
        } else {
            json = nil
        }
    }

    struct Line: Encodable {
        var elapsedSeconds: Double
        var phase: String
        var fraction: Double
        var streamBytes: UInt64
        var remainingBytes: UInt64?
        var bitsPerSecond: Double
        var interfaceBitsPerSecond: [String: Double]
        var liveChannels: Int
        /// What the migration waits for, while it waits (e.g. "queued at the destination
        /// (position 1 of 2)").
        var note: String?
        var queuePosition: Int?
        var queueLength: Int?
        /// Limits on the guest's writes to its disks (vda: bytes per second), if any.
        var diskWriteLimits: [String: UInt64]?
        /// The vCPU throttle QEMU applies (`--converge`), percent, when it applies one.
        var throttlePercent: Int?
    }

    func show(_ p: MigrationProgress) {
        lock.lock()
        defer { lock.unlock() }
        if let json {
            let total = p.qemu.map { $0.transferredBytes + $0.remainingBytes } ?? 0
            let line = Line(elapsedSeconds: p.elapsedSeconds, phase: p.phase.rawValue,
                            fraction: total > 0 ? Double(p.qemu!.transferredBytes) / Double(total) : 0,
                            streamBytes: p.streamBytes, remainingBytes: p.qemu?.remainingBytes, bitsPerSecond: p.bitsPerSecond,
                            interfaceBitsPerSecond: p.interfaceBitsPerSecond, liveChannels: p.channels.filter(\.alive).count,
                            note: p.note, queuePosition: p.queuePosition, queueLength: p.queueLength,
                            diskWriteLimits: p.diskWriteLimits.isEmpty ? nil : p.diskWriteLimits,
                            throttlePercent: (p.qemu?.cpuThrottlePercentage ?? 0) > 0 ? p.qemu?.cpuThrottlePercentage : nil)
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            if let data = try? encoder.encode(line) { json.write(data + Data("\n".utf8)) }
        }
        guard enabled else { return }
        if !tty && p.elapsedSeconds - lastLine < 1 && (p.phase == .transferring || p.phase == .queued) { return }
        lastLine = p.elapsedSeconds
        var parts: [String] = []
        if let q = p.qemu, p.phase == .transferring || p.phase == .switchover {
            let total = q.transferredBytes + q.remainingBytes
            let fraction = total > 0 ? min(1, Double(q.transferredBytes) / Double(total)) : 0
            let width = 20
            let filled = Int(fraction * Double(width))
            parts.append("[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "]")
            parts.append(String(format: "%3.0f%%", fraction * 100))
            parts.append("\(Format.bytes(p.streamBytes)) sent")
            parts.append(Format.rate(p.bitsPerSecond))
            let nics = p.interfaceBitsPerSecond.sorted { $0.key < $1.key }.map { "\($0.key) \(Format.rate($0.value))" }
            if nics.count > 0 { parts.append("(" + nics.joined(separator: ", ") + ")") }
            parts.append("remaining \(Format.bytes(q.remainingBytes))")
            if q.dirtyBytesPerSecond > 0 { parts.append("dirty \(Format.bytes(q.dirtyBytesPerSecond))/s") }
            if let d = q.expectedDowntimeMilliseconds, d > 0 { parts.append("exp. downtime \(Format.millis(d))") }
            if q.cpuThrottlePercentage > 0 { parts.append("vCPUs throttled \(q.cpuThrottlePercentage)%") }
        } else if let note = p.note {
            parts.append(note)
        } else {
            parts.append(p.phase.rawValue + "...")
        }
        if !p.diskWriteLimits.isEmpty {
            parts.append("guest writes limited: " + p.diskWriteLimits.sorted { $0.key < $1.key }
                .map { "\($0.key) \(Format.bytes($0.value))/s" }.joined(separator: ", "))
        }
        parts.append(String(format: "%.1fs", p.elapsedSeconds))
        let line = parts.joined(separator: "  ")
        if tty {
            FileHandle.standardError.write(Data(("\r\u{1B}[K" + line).utf8))
            drew = true
        } else {
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
    }

    func finish() {
        lock.withLock {
            if drew { FileHandle.standardError.write(Data("\n".utf8)) }
        }
    }
}

/// `--multifd auto|N`.
enum MultifdChoice: ExpressibleByArgument, Equatable {
    case auto
    case count(Int)
    init?(argument: String) {
        if argument == "auto" { self = .auto; return }
        guard let n = Int(argument) else { return nil }
        self = .count(n)
    }
    var defaultValueDescription: String {
        if case .count(let n) = self { return "\(n)" }
        return "auto"
    }
}
