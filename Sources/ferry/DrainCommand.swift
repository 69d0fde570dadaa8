import CFerryLinux
import ArgumentParser
import FerryCompress
import FerryIO
import FerryMetrics
import FerryMigration
import FerryVM
import FerryWire
import Foundation

/// The tuning `ferry migrate` and `ferry drain` share: how each migration is carried.
struct TuningOptions: ParsableArguments {
    @Option(help: "QEMU multifd channels: 0 sends everything in QEMU's main stream (Ferry still stripes it over every NIC); auto uses one stream up to 10 Gbit/s of NICs and one channel per 10 Gbit/s above, NICs of unknown speed counting as nothing (default: auto).")
    var multifd: MultifdChoice = .auto

    @Option(name: .customLong("channels-per-nic"), help: "Data connections per NIC pair (default: 4).")
    var channelsPerNIC = 4

    @Option(help: "Compression of the chunks: auto (measures, and compresses only while the link is the bottleneck and it pays), none, lz4, zstd or zstd:LEVEL (default: auto).")
    var compress = "auto"

    @Option(name: .customLong("zero-copy"), help: "auto: splice chunks from QEMU to the NICs without copying them through Ferry wherever Ferry need not see the bytes (--insecure with --compress none); off: always copy (default: auto).")
    var zeroCopy: ZeroCopyChoice = .auto

    @Option(help: "Cap on the migration's rate over all NICs together, e.g. 500mbit or 100MB (default: none).")
    var bandwidth: Rate?

    @Option(name: .customLong("link-timeout"), help: "With every NIC down, wait this long for one to come back before giving up (default: 10s).")
    var linkTimeout = DurationArgument(.seconds(10))

    @Option(help: "Longest guest pause QEMU may plan for at switchover (default: 300ms).")
    var downtime = DurationArgument(.milliseconds(300))

    @Option(help: "Give up (the VM stays here) if the migration has not reached its commit point after this long, time spent queued included (default: 10m).")
    var timeout = DurationArgument(.seconds(600))

    @Option(help: "A guest that dirties its memory faster than the link carries it: throttle slows its vCPUs as little as will let the migration finish (QEMU's auto-converge, steered by the rates Ferry measures); postcopy runs it at the destination once QEMU's first pass is done (needs --postcopy allowed); auto throttles, and turns to postcopy where allowed when the throttle cannot finish in time; none leaves it to --timeout (default: auto).")
    var converge: ConvergeMode = .auto

    @Option(help: "never, or allowed: the migration may switch to postcopy, where the VM runs at the destination before all its memory is there; until it completes both hosts are needed, and a crash of either QEMU or either host loses the VM (default: never).")
    var postcopy: PostcopyPolicy = .never

    @Option(name: .customLong("max-throttle"), help: "The most --converge may slow the guest's vCPUs, percent, 1-99 (default: 99).")
    var maxThrottle = 99

    func validate() throws {
        if case .count(let n) = multifd, !(0...64).contains(n) { throw ValidationError("--multifd must be auto or between 0 and 64") }
        guard (1...64).contains(channelsPerNIC) else { throw ValidationError("--channels-per-nic must be between 1 and 64") }
        guard ConvergencePolicy.qemuRange.contains(maxThrottle) else { throw ValidationError("--max-throttle must be between 1 and 99") }
        if converge == .postcopy && postcopy != .allowed {
            throw ValidationError("--converge postcopy needs --postcopy allowed: in postcopy the VM needs both hosts until the migration completes")
        }
        do {
            _ = try CompressionMode(parsing: compress)
        } catch {
            throw ValidationError("--compress: \(error)")
        }
    }

    /// A migration's options to `host:port` with this tuning and the NICs, CPUs and keys given.
    func options(host: String, port: UInt16, keys: KeyRing?, nics: NICOptions, cpus: CPUOptions) throws -> MigrationOptions {
        var options = MigrationOptions(host: host, port: port)
        options.keys = keys
        options.compression = try CompressionMode(parsing: compress)
        if case .count(let n) = multifd { options.multifdChannels = n }
        options.channelsPerEndpoint = channelsPerNIC
        options.bandwidthBytesPerSecond = bandwidth?.bytesPerSecond
        options.nics = nics.selection
        options.nicSpeeds = NICSpeeds.resolve(nics.nicSpeed)
        options.linkTimeout = linkTimeout.duration
        options.downtimeLimit = downtime.duration
        options.timeout = timeout.duration
        options.zeroCopy = zeroCopy == .auto
        options.cpus = cpus.set
        options.converge = converge
        options.maxThrottlePercent = maxThrottle
        options.postcopy = postcopy
        return options
    }
}

extension ConvergeMode: ExpressibleByArgument {}
extension PostcopyPolicy: ExpressibleByArgument {}

struct Drain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Move every VM of this host to the hosts given (host maintenance).",
        discussion: """
            Asks each destination's `ferry serve` what it has room for (free guest memory, load, link speed, VMs,
            whether it is draining itself), places each VM where it fits best, prints the plan, and migrates: at most
            --parallel at once from this host and --per-destination to any one host. A VM whose migration fails stays
            here and runs on; the drain goes on with the others. While the drain runs this host refuses incoming
            migrations. Ctrl-C (or SIGTERM) starts no new migration and lets the running ones finish; a second one
            cancels them too (each rolls back until its commit point, the VM staying here). If any VM fits nowhere
            the drain refuses to start and changes nothing. Exit status: 0 every VM moved, 1 some VM stayed here,
            3 a migration's outcome is uncertain (see its report).
            """)

    @Option(help: "The destinations, HOST[:PORT] separated by commas or the option repeated (default port \(Endpoint.defaultPort)).",
            transform: { text in
                let list = text.split(separator: ",").map(String.init)
                return try list.map { item in
                    guard let e = Endpoint(argument: item.trimmingCharacters(in: .whitespaces)) else { throw ValidationError("--to: '\(item)' is not HOST[:PORT]") }
                    return e
                }
            })
    var to: [[Endpoint]] = []

    @Option(help: "Migrations from this host at once (default: $FERRY_MAX_OUTGOING_MIGRATIONS, else 2).")
    var parallel: Int?

    @Option(name: .customLong("per-destination"), help: "Migrations to any one destination at once (default: 1; a destination also queues past its own --max-migrations).")
    var perDestination = 1

    @Flag(name: .customLong("dry-run"), help: "Print the plan and change nothing.")
    var dryRun = false

    @OptionGroup var tuning: TuningOptions
    @OptionGroup var cpuOptions: CPUOptions
    @OptionGroup var nicOptions: NICOptions
    @OptionGroup var output: ReportOptions
    @OptionGroup var security: SecurityOptions
    @OptionGroup var host: HostOptions

    var destinations: [Endpoint] { to.flatMap { $0 } }

    func validate() throws {
        guard !destinations.isEmpty else { throw ValidationError("Missing expected argument '--to <to>'") }
        if destinations.contains(where: \.isThisHost) { throw ValidationError("--to names this host: a drain moves VMs to other hosts") }
        if Set(destinations.map { "\($0.host):\($0.port)" }).count != destinations.count { throw ValidationError("--to names a host twice") }
        if let parallel, !(1...64).contains(parallel) { throw ValidationError("--parallel must be between 1 and 64") }
        guard (1...64).contains(perDestination) else { throw ValidationError("--per-destination must be between 1 and 64") }
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        _ = ferry_raise_nofile_limit()
        let keys = try security.keys(for: "drain")
        let logger = host.logger("ferry.drain")
        let store = host.store
        let paths = host.paths
        try paths.ensure()

        // What moves: every VM that runs (or is paused) here; what cannot, and why.
        var vms: [DrainPlan.VM] = []
        var cannot: [String] = []
        for entry in store.entries() {
            switch entry {
            case .healthy(let record) where record.alive && record.state.phase == .running:
                vms.append(DrainPlan.VM(name: record.spec.name, memoryMiB: record.spec.memoryMiB))
            case .healthy(let record) where record.alive:
                cannot.append("\(record.spec.name) (\(record.state.phase.rawValue))")
            case .healthy:
                break  // stopped or dead: nothing runs to move
            case .damaged(let vm):
                cannot.append("\(vm.name) (damaged: `ferry vm list`)")
            }
        }
        // Each destination's answer, before anything moves: one that cannot answer stops
        // the drain here.
        var answers: [DrainPlan.Destination] = []
        for d in destinations {
            do {
                let info = try HostQuery.ask(host: d.host, port: d.port, keys: keys)
                answers.append(DrainPlan.Destination(name: d.host, port: d.port, info: info))
            } catch {
                throw UserError("ferry drain: \(error); nothing was moved")
            }
        }
        let plan = DrainPlan.make(vms: vms, destinations: answers)
        let header = "Drain of \(HostInfo.hostname): \(vms.count) VM(s) to " + destinations.map(\.host).joined(separator: ", ")
        if !output.json || dryRun {
            print(header)
            print(plan.text)
            if !cannot.isEmpty { print("  not moved (not running or damaged): " + cannot.joined(separator: ", ")) }
        }
        if dryRun {
            if output.json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try encoder.encode(plan), as: UTF8.self))
            }
            print("dry run: nothing moved")
            return
        }
        guard plan.unplaced.isEmpty else {
            throw UserError("ferry drain: \(plan.unplaced.count) VM(s) fit nowhere (" + plan.unplaced.map(\.vm).joined(separator: ", ")
                            + "): add a destination or make room; nothing was moved")
        }
        if vms.isEmpty {
            print("nothing to drain: no VM runs here")
            return
        }
        do {
            try DrainMarker(destinations: destinations.map(\.host)).write(runDirectory: paths.runDirectory)
        } catch {
            throw UserError("ferry drain: \(error)")
        }
        defer { DrainMarker.remove(runDirectory: paths.runDirectory) }

        let tuning = self.tuning, nics = nicOptions, cpus = cpuOptions
        // Checked by validate(); a bad value cannot reach here.
        let base = try tuning.options(host: "", port: 0, keys: keys, nics: nics, cpus: cpus)
        var options = DrainRun.Options(parallel: parallel ?? OutgoingSlot.limitFromEnvironment, perDestination: perDestination) { placement in
            var o = base
            o.host = placement.destination
            o.port = placement.port
            return o
        }
        // The daemon's metrics count the drain's migrations as it counts `ferry migrate`'s.
        let metrics = MetricsReporter(paths: paths)
        options.started = { metrics.started(vm: $0, role: .source) }
        options.ended = { metrics.ended(report: $0, role: .source) }
        options.migrationProgress = { metrics.progress(vm: $0, channels: $1.channels) }
        let display = DrainDisplay(enabled: !output.quiet)
        let run = DrainRun(store: store, plan: plan, options: options, logger: logger) { display.show($0) }
        let signals = DrainSignals(run: run)
        let report = run.run()
        signals.release()
        if let file = output.reportFile { try report.json.write(toFile: file, atomically: true, encoding: .utf8) }
        print(output.json ? report.json : report.text)
        if report.exitStatus != 0 { throw ExitCode(report.exitStatus) }
    }
}

/// Ctrl-C and SIGTERM during a drain: the first starts no new migration, the second
/// cancels the running ones.
final class DrainSignals {
    private var sources: [DispatchSourceSignal] = []

    init(run: DrainRun) {
        for number in [SIGINT, SIGTERM] {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                let text: String
                if run.stopStarting() {
                    text = "stopping the drain: no new migrations; the running ones finish (again to cancel them)"
                } else {
                    let cancelled = run.cancelRunning()
                    text = cancelled.isEmpty ? "nothing left to cancel: the running migrations are past their commit point"
                        : "cancelling " + cancelled.joined(separator: ", ") + ": they roll back and keep running here"
                }
                FileHandle.standardError.write(Data(("\nferry drain: " + text + "\n").utf8))
            }
            source.resume()
            sources.append(source)
        }
        // `ferry migrate --cancel VM`: that VM's migration only.
        signal(SIGUSR1, SIG_IGN)
        let one = DispatchSource.makeSignalSource(signal: SIGUSR1, queue: .global())
        one.setEventHandler {
            for name in run.answerPostcopyRequests() {
                FileHandle.standardError.write(Data("\nferry drain: \(name): postcopy asked for (ferry migrate --postcopy-now)\n".utf8))
            }
            let cancelled = run.cancelRequested()
            if !cancelled.isEmpty {
                FileHandle.standardError.write(Data(("\nferry drain: cancelling " + cancelled.joined(separator: ", ") + " (ferry migrate --cancel): it rolls back and keeps running here\n").utf8))
            }
        }
        one.resume()
        sources.append(one)
    }

    func release() {
        for source in sources { source.cancel() }
        sources = []
        signal(SIGINT, SIG_DFL)
        signal(SIGTERM, SIG_DFL)
        signal(SIGUSR1, SIG_DFL)
    }
}

/// The drain's progress on stderr: one line per VM and one for the whole, redrawn on a
/// terminal; a line a second otherwise (what a journal or a log file reads well).
final class DrainDisplay: @unchecked Sendable {
    private let enabled: Bool
    private let tty = isatty(STDERR_FILENO) == 1
    private var drawnLines = 0
    private var lastLine = -1.0
    private let lock = Monitor()

    init(enabled: Bool) { self.enabled = enabled }

    func show(_ p: DrainProgress) {
        guard enabled else { return }
        lock.withLock {
            if !tty && p.elapsedSeconds - lastLine < 1 && p.done < p.vms.count { return }
            lastLine = p.elapsedSeconds
            let total = String(format: "drain: %d of %d done (%d moved), %d running, %d waiting%@  %.1fs",
                               p.done, p.vms.count, p.moved, p.running, p.vms.filter { $0.state == .waiting }.count,
                               p.stopping ? ", STOPPING" : "", p.elapsedSeconds)
            if tty {
                var text = drawnLines > 0 ? "\u{1B}[\(drawnLines)A" : ""
                var lines = [total]
                for vm in p.vms { lines.append("  " + Self.describe(vm)) }
                for line in lines { text += "\r\u{1B}[K" + line + "\n" }
                drawnLines = lines.count
                FileHandle.standardError.write(Data(text.utf8))
            } else {
                let running = p.vms.filter { $0.state == .running }.map(Self.describe)
                FileHandle.standardError.write(Data(([total] + running.map { "  " + $0 }).joined(separator: "\n").appending("\n").utf8))
            }
        }
    }

    static func describe(_ vm: DrainVMProgress) -> String {
        var line = "\(vm.vm.padding(16)) -> \(vm.destination.padding(10)) \(vm.state.rawValue)"
        if vm.state == .running {
            line += String(format: "  %3.0f%%", vm.fraction * 100)
            if let phase = vm.phase { line += "  \(phase)" }
            if vm.bitsPerSecond > 0 { line += "  \(Format.rate(vm.bitsPerSecond))" }
            if let note = vm.note { line += "  \(note)" }
        }
        return line
    }
}
