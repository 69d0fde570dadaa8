import CFerryLinux
import ArgumentParser
import FerryIO
import FerryInterfaces
import FerryMetrics
import FerryMigration
import FerryVM
import Foundation

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Accept incoming migrations on this host (runs in the foreground; use your service manager).")

    @Option(help: "An address (and port) to listen on; repeat for several, all on one port. Only NICs with such an address carry data channels. 0.0.0.0 listens everywhere (default: $FERRY_LISTEN, comma-separated, else every address of the migration NICs --nics selects, port \(Endpoint.defaultPort)).")
    var listen: [Endpoint] = []

    @Option(name: .customLong("pid-file"), help: "Write the daemon's pid here (default: <state-dir>/run/serve.pid).")
    var pidFile: String?

    @OptionGroup var nicOptions: NICOptions

    @Option(name: .customLong("max-bandwidth"), help: "Most all incoming migrations together may use, shared equally, e.g. 2gbit (default: $FERRY_MAX_BANDWIDTH, else no limit).")
    var maxBandwidth: Rate?

    @Option(name: .customLong("max-migrations"), help: "Incoming migrations that transfer at once; more are accepted and wait in line, first come first served (default: $FERRY_MAX_MIGRATIONS, else 2).")
    var maxMigrations: Int?

    @Option(name: .customLong("max-guest-memory"), help: "The most guest memory this host takes in all, e.g. 64G: an incoming VM past it is refused, and `ferry drain` places none here past it (default: $FERRY_MAX_GUEST_MEMORY, else only the host's memory limits it).")
    var maxGuestMemory: MemorySize?

    @Option(name: .customLong("disk-dir"), help: "Where the disks copied here go, as DIR/VM/diskN.FORMAT (default: $FERRY_DISK_DIR, else the state root's disks/).")
    var diskDirectory: String?

    @Option(name: .customLong("libvirt-socket"), help: "The libvirtd that libvirt migrations carried here are connected to, or 'none' to take none (default: $FERRY_LIBVIRT_SOCKET, else \(LibvirtRun.defaultSocket)).")
    var libvirtSocket: String?

    @Option(help: "Serve Prometheus metrics at http://[HOST:]PORT/metrics, on loopback (127.0.0.1) unless HOST is given; this host's ferry migrate processes report to the daemon (default: off, or \(MetricsAddress.environmentVariable) if set).")
    var metrics: String?

    @OptionGroup var cpuOptions: CPUOptions

    @OptionGroup var security: SecurityOptions

    @OptionGroup var host: HostOptions

    func validate() throws {
        if let maxMigrations, !(1...64).contains(maxMigrations) { throw ValidationError("--max-migrations must be between 1 and 64") }
        if Set(listen.map(\.port)).count > 1 {
            throw ValidationError("every --listen must use the same port (data channels are told one port)")
        }
        do {
            _ = try MetricsAddress.resolve(flag: metrics)
        } catch {
            throw ValidationError(error.description)
        }
        _ = try settings()
    }

    /// The flags, else their variables (which the configuration file may have set), else
    /// the defaults. A bad variable is an error that names it.
    struct Settings {
        var listen: [Endpoint]
        var maxMigrations: Int
        var maxBandwidth: Rate?
        var diskDirectory: String?
        var maxGuestMemory: MemorySize?
    }

    func settings() throws -> Settings {
        var listen = self.listen
        if listen.isEmpty, let text = EnvironmentSettings.value("FERRY_LISTEN") {
            do { listen = try EnvironmentSettings.listen(text) } catch { throw ValidationError("FERRY_LISTEN=\(text): \(error)") }
        }
        let environmentMax = try EnvironmentSettings.checked("FERRY_MAX_MIGRATIONS") { Int($0).flatMap { (1...64).contains($0) ? $0 : nil } }
        return Settings(listen: listen, maxMigrations: maxMigrations ?? environmentMax ?? 2,
                        maxBandwidth: try maxBandwidth ?? EnvironmentSettings.checked("FERRY_MAX_BANDWIDTH", Rate.init(argument:)),
                        diskDirectory: diskDirectory ?? EnvironmentSettings.value("FERRY_DISK_DIR"),
                        maxGuestMemory: try maxGuestMemory ?? EnvironmentSettings.checked("FERRY_MAX_GUEST_MEMORY", MemorySize.init(argument:)))
    }

    func run() throws {
        // SIGTERM (systemctl stop or restart, KillMode=process) and SIGINT end the daemon by
        // their default action, at once; its QEMUs run on, and the next daemon's reconciler
        // settles what it left. A parent that started it from a thread that blocks signals
        // (Dispatch's workers do: a test, a supervisor in Swift) hands that mask on across
        // exec, and a blocked SIGTERM would leave the daemon holding its port: unblock them.
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        sigaddset(&stopSignals, SIGTERM)
        sigaddset(&stopSignals, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &stopSignals, nil)
        // Spliced chunks hold a pipe (two descriptors) each, a window's worth per migration.
        _ = ferry_raise_nofile_limit()
        let keys = try security.keys(for: "serve")
        let logger = host.logger("ferry.serve", default: .info)
        let settings = try settings()
        let listen = settings.listen
        let paths = host.paths
        try paths.ensure()
        let served: ServeMetrics?
        do {
            served = try MetricsAddress.resolve(flag: metrics).map { try ServeMetrics(address: $0, store: host.store) }
        } catch {
            throw UserError("cannot serve metrics: \(error)")
        }
        let server: MigrationServer
        do {
            let nics = nicOptions.selection
            let speeds = NICSpeeds.resolve(nicOptions.nicSpeed)
            let addresses = listen.isEmpty ? MigrationServer.defaultAddresses(nics: nics, speeds: speeds) : listen.map(\.host)
            guard !addresses.isEmpty else {
                throw UserError("no NIC address to listen on (none is up, or --nics left none); give --listen ADDRESS")
            }
            var options = MigrationServer.Options(addresses: addresses, port: listen.first?.port ?? Endpoint.defaultPort)
            options.nics = nics
            options.nicSpeeds = speeds
            options.maxBandwidthBytesPerSecond = settings.maxBandwidth?.bytesPerSecond
            options.keys = keys
            options.cpus = cpuOptions.set
            options.maxMigrations = settings.maxMigrations
            options.maxGuestMemoryBytes = settings.maxGuestMemory.map { UInt64($0.mebibytes) << 20 }
            options.diskDirectory = settings.diskDirectory.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
            options.onIncoming = served?.onIncoming
            let socket = libvirtSocket ?? ProcessInfo.processInfo.environment["FERRY_LIBVIRT_SOCKET"] ?? LibvirtRun.defaultSocket
            options.libvirtSocket = socket == "none" ? nil : URL(fileURLWithPath: socket).standardizedFileURL.path
            server = try MigrationServer(store: host.store, options: options, logger: logger)
        } catch {
            throw UserError("cannot listen: \(error)")
        }
        served?.incoming.withLock { $0 = server }
        for line in server.reconcile() { print("ferry serve: \(line)") }
        let pidPath = pidFile ?? paths.runDirectory + "/serve.pid"
        try "\(getpid())\n".write(toFile: pidPath, atomically: true, encoding: .utf8)
        try? "\(server.port)\n".write(toFile: paths.servePortFile, atomically: true, encoding: .utf8)
        signal(SIGPIPE, SIG_IGN)
        print("ferry serve: listening on \(server.options.addresses.map { ($0.contains(":") ? "[\($0)]" : $0) + ":\(server.port)" }.joined(separator: ", ")) (state in \(paths.root); "
              + (keys.map { "cluster key \($0.primary.id)" + ($0.keys.count > 1 ? " + \($0.keys.count - 1) accepted" : "") } ?? "INSECURE") + ")")
        if let served {
            print("ferry serve: metrics on http://\(MetricsAddress(host: served.server.address.host, port: served.server.port))/metrics")
        }
        fflush(nil)
        server.run()
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show this host's Ferry daemon, NICs, migrations and VMs.")

    @Flag(help: "Print the status as JSON (for scripts).")
    var json = false

    @OptionGroup var host: HostOptions

    /// What `ferry status` shows, as `--json` prints it.
    struct Snapshot: Encodable {
        struct Daemon: Encodable {
            var running: Bool
            var pid: Int32?
        }
        struct NIC: Encodable {
            var name: String
            var up: Bool
            var speedBitsPerSecond: UInt64?
            var mtu: Int
            var addresses: [String]
        }
        struct Migration: Encodable {
            var vm: String
            /// incoming: the source host; outgoing: the `ferry migrate` or `ferry drain` pid.
            var peer: String
            var state: String
            var since: Date?
            var position: Int?
        }
        struct Migrations: Encodable {
            /// nil when the daemon's picture cannot be trusted (no daemon, or its file is damaged).
            var incoming: [Migration]?
            var incomingLimit: Int?
            var incomingProblem: String?
            var outgoing: [Migration]
            var outgoingLimit: Int
        }
        struct VM: Encodable {
            var name: String
            /// running, incoming, migrating-out, updating; dead; damaged.
            var state: String
            var memoryMiB: Int?
            var problem: String?
        }
        var host: String
        var stateDirectory: String
        var accelerator: String
        var daemon: Daemon
        var draining: DrainMarker?
        var nics: [NIC]
        var migrations: Migrations
        var vms: [VM]
    }

    func snapshot() -> Snapshot {
        let paths = host.paths
        let pidPath = paths.runDirectory + "/serve.pid"
        var daemon: Int32?
        if let text = try? String(contentsOfFile: pidPath, encoding: .utf8), let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)),
           ProcessStats.isAlive(pid: pid), ProcessStats.commandLine(pid: pid)?.contains("serve") == true {
            daemon = pid
        }
        let nics = InterfaceDiscovery.list(speeds: NICSpeeds.resolve(nil)).filter { !$0.isLoopback }.map { nic in
            Snapshot.NIC(name: nic.name, up: nic.carrier, speedBitsPerSecond: nic.speedBitsPerSecond, mtu: nic.mtu,
                         addresses: nic.addresses.filter { !$0.isLinkLocal }.map { "\($0.address)/\($0.prefixLength)" })
        }
        var migrations = Snapshot.Migrations(outgoing: [], outgoingLimit: OutgoingSlot.limitFromEnvironment)
        let read = IncomingMigrations.load(runDirectory: paths.runDirectory)
        if let daemon, let damage = read.damage {
            // Never a guess at what the daemon runs: the file says nothing it can be trusted for.
            migrations.incomingProblem = "\(damage.path) \(damage.problem); ferry serve (pid \(daemon)) rewrites it when its migrations change"
        }
        if let daemon, let incoming = read.value, incoming.pid == daemon {
            migrations.incomingLimit = incoming.limit
            migrations.incoming = incoming.running.map { Snapshot.Migration(vm: $0.vm, peer: $0.source, state: "running", since: $0.admittedAt ?? $0.since) }
                + incoming.queued.enumerated().map { Snapshot.Migration(vm: $0.element.vm, peer: $0.element.source, state: "queued", since: $0.element.since, position: $0.offset + 1) }
        }
        let outgoing = OutgoingSlot.snapshot(runDirectory: paths.runDirectory)
        migrations.outgoing = outgoing.holders.map { Snapshot.Migration(vm: $0.vm, peer: "pid \($0.pid)", state: "running") }
            + outgoing.waiting.enumerated().map { Snapshot.Migration(vm: $0.element.vm, peer: "pid \($0.element.pid)", state: "queued", since: $0.element.since, position: $0.offset + 1) }
        let vms = host.store.entries().map { entry -> Snapshot.VM in
            switch entry {
            case .healthy(let r): Snapshot.VM(name: entry.name, state: entry.stateName, memoryMiB: r.spec.memoryMiB)
            case .damaged(let d): Snapshot.VM(name: entry.name, state: entry.stateName, problem: d.problems.joined(separator: "; "))
            }
        }
        return Snapshot(host: HostInfo.hostname, stateDirectory: paths.root, accelerator: HostInfo.hasHardwareVirtualization ? "kvm" : "tcg",
                        daemon: .init(running: daemon != nil, pid: daemon), draining: DrainMarker.current(runDirectory: paths.runDirectory),
                        nics: nics, migrations: migrations, vms: vms)
    }

    func run() throws {
        let s = snapshot()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            encoder.dateEncodingStrategy = .iso8601
            print(String(decoding: try encoder.encode(s), as: UTF8.self))
            return
        }
        print("ferry serve: " + (s.daemon.pid.map { "running (pid \($0))" } ?? "not running"))
        print("host: \(s.host), state: \(s.stateDirectory), accelerator: \(s.accelerator)")
        if let d = s.draining {
            print("DRAINING to \(d.destinations.joined(separator: ", ")) (ferry drain pid \(d.pid), since \(Self.age(d.since)) ago): incoming migrations are refused")
        }
        print("NICs:")
        for nic in s.nics {
            let speed = nic.speedBitsPerSecond.map { String(format: "%.2f Gbit/s", Double($0) / 1e9) } ?? "speed unknown"
            print("  \(nic.name.padding(10))\(nic.up ? "up  " : "down")  \(speed.padding(16))mtu \(nic.mtu)  \(nic.addresses.joined(separator: " "))")
        }
        let m = s.migrations
        if let problem = m.incomingProblem { print("incoming migrations: unknown: \(problem)") }
        if let incoming = m.incoming, let limit = m.incomingLimit {
            print("incoming migrations: \(incoming.filter { $0.state == "running" }.count) running, \(incoming.filter { $0.state == "queued" }.count) queued (--max-migrations \(limit))")
            let queued = incoming.filter { $0.state == "queued" }.count
            for e in incoming {
                if e.state == "running" {
                    print("  running  \(e.vm.padding(16)) from \(e.peer), for \(e.since.map(Self.age) ?? "?")")
                } else {
                    print("  queued   \(e.vm.padding(16)) from \(e.peer), position \(e.position ?? 0) of \(queued), waiting \(e.since.map(Self.age) ?? "?")")
                }
            }
        }
        if !m.outgoing.isEmpty {
            let queued = m.outgoing.filter { $0.state == "queued" }.count
            print("outgoing migrations: \(m.outgoing.count - queued) running, \(queued) queued (at most \(m.outgoingLimit), FERRY_MAX_OUTGOING_MIGRATIONS)")
            for e in m.outgoing {
                if e.state == "running" {
                    print("  running  \(e.vm.padding(16)) ferry migrate \(e.peer)")
                } else {
                    print("  queued   \(e.vm.padding(16)) ferry migrate \(e.peer), position \(e.position ?? 0) of \(queued), waiting \(e.since.map(Self.age) ?? "?")")
                }
            }
        }
        print("VMs: \(s.vms.count)" + (s.vms.isEmpty ? "" : " (" + s.vms.map { "\($0.name) \($0.state)" }.joined(separator: ", ") + ")"))
        if s.vms.contains(where: { $0.state == "damaged" }) { print("  damaged VMs: `ferry vm list` says what is damaged and how to repair it") }
    }

    static func age(_ since: Date) -> String { String(format: "%.0f s", Date().timeIntervalSince(since)) }
}
