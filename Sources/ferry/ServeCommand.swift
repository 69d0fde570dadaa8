import CFerryLinux
import ArgumentParser
import FerryIO
import FerryInterfaces
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

    @Option(name: .customLong("disk-dir"), help: "Where the disks copied here go, as DIR/VM/diskN.FORMAT (default: $FERRY_DISK_DIR, else the state root's disks/).")
    var diskDirectory: String?

    @OptionGroup var cpuOptions: CPUOptions

    @OptionGroup var security: SecurityOptions

    @OptionGroup var host: HostOptions

    func validate() throws {
        if let maxMigrations, !(1...64).contains(maxMigrations) { throw ValidationError("--max-migrations must be between 1 and 64") }
        if Set(listen.map(\.port)).count > 1 {
            throw ValidationError("every --listen must use the same port (data channels are told one port)")
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
    }

    func settings() throws -> Settings {
        var listen = self.listen
        if listen.isEmpty, let text = EnvironmentSettings.value("FERRY_LISTEN") {
            do { listen = try EnvironmentSettings.listen(text) } catch { throw ValidationError("FERRY_LISTEN=\(text): \(error)") }
        }
        let environmentMax = try EnvironmentSettings.checked("FERRY_MAX_MIGRATIONS") { Int($0).flatMap { (1...64).contains($0) ? $0 : nil } }
        return Settings(listen: listen, maxMigrations: maxMigrations ?? environmentMax ?? 2,
                        maxBandwidth: try maxBandwidth ?? EnvironmentSettings.checked("FERRY_MAX_BANDWIDTH", Rate.init(argument:)),
                        diskDirectory: diskDirectory ?? EnvironmentSettings.value("FERRY_DISK_DIR"))
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
            options.diskDirectory = settings.diskDirectory.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
            server = try MigrationServer(store: host.store, options: options, logger: logger)
        } catch {
            throw UserError("cannot listen: \(error)")
        }
        for line in server.reconcile() { print("ferry serve: \(line)") }
        let pidPath = pidFile ?? paths.runDirectory + "/serve.pid"
        try "\(getpid())\n".write(toFile: pidPath, atomically: true, encoding: .utf8)
        try? "\(server.port)\n".write(toFile: paths.servePortFile, atomically: true, encoding: .utf8)
        signal(SIGPIPE, SIG_IGN)
        print("ferry serve: listening on \(server.options.addresses.map { ($0.contains(":") ? "[\($0)]" : $0) + ":\(server.port)" }.joined(separator: ", ")) (state in \(paths.root); "
              + (keys.map { "cluster key \($0.primary.id)" + ($0.keys.count > 1 ? " + \($0.keys.count - 1) accepted" : "") } ?? "INSECURE") + ")")
        fflush(nil)
        server.run()
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show this host's Ferry daemon and VMs.")

    @OptionGroup var host: HostOptions

    func run() throws {
        let paths = host.paths
        let pidPath = paths.runDirectory + "/serve.pid"
        var daemon: Int32?
        if let text = try? String(contentsOfFile: pidPath, encoding: .utf8), let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)),
           ProcessStats.isAlive(pid: pid), ProcessStats.commandLine(pid: pid)?.contains("serve") == true {
            print("ferry serve: running (pid \(pid))")
            daemon = pid
        } else {
            print("ferry serve: not running")
        }
        print("host: \(HostInfo.hostname), state: \(paths.root), accelerator: \(HostInfo.hasHardwareVirtualization ? "kvm" : "tcg")")
        print("NICs:")
        for nic in InterfaceDiscovery.list(speeds: NICSpeeds.resolve(nil)) where !nic.isLoopback {
            let speed = nic.speedBitsPerSecond.map { String(format: "%.2f Gbit/s", Double($0) / 1e9) } ?? "speed unknown"
            let addrs = nic.addresses.filter { !$0.isLinkLocal }.map { "\($0.address)/\($0.prefixLength)" }.joined(separator: " ")
            print("  \(nic.name.padding(10))\(nic.carrier ? "up  " : "down")  \(speed.padding(16))mtu \(nic.mtu)  \(addrs)")
        }
        printMigrations(paths: paths, daemon: daemon)
        let entries = host.store.entries()
        let described = entries.map { entry -> String in
            switch entry {
            case .healthy(let r): "\(r.spec.name) \(r.alive ? r.state.phase.rawValue : "dead")"
            case .damaged(let d): "\(d.name) damaged"
            }
        }
        print("VMs: \(entries.count)" + (entries.isEmpty ? "" : " (" + described.joined(separator: ", ") + ")"))
        if described.contains(where: { $0.hasSuffix(" damaged") }) { print("  damaged VMs: `ferry vm list` says what is damaged and how to repair it") }
    }
}

extension Status {
    /// Incoming migrations (the daemon's `incoming.json`) and outgoing ones (the slot files
    /// and the line of `ferry migrate` processes waiting for one).
    func printMigrations(paths: StatePaths, daemon: Int32?) {
        let now = Date()
        func age(_ since: Date) -> String { String(format: "%.0f s", now.timeIntervalSince(since)) }
        let read = IncomingMigrations.load(runDirectory: paths.runDirectory)
        if let daemon, let damage = read.damage {
            // Never a guess at what the daemon runs: the file says nothing it can be trusted for.
            print("incoming migrations: unknown: \(damage.path) \(damage.problem); ferry serve (pid \(daemon)) rewrites it when its migrations change")
        }
        if let daemon, let incoming = read.value, incoming.pid == daemon {
            print("incoming migrations: \(incoming.running.count) running, \(incoming.queued.count) queued (--max-migrations \(incoming.limit))")
            for e in incoming.running {
                print("  running  \(e.vm.padding(16)) from \(e.source), for \(age(e.admittedAt ?? e.since))")
            }
            for (i, e) in incoming.queued.enumerated() {
                print("  queued   \(e.vm.padding(16)) from \(e.source), position \(i + 1) of \(incoming.queued.count), waiting \(age(e.since))")
            }
        }
        let outgoing = OutgoingSlot.snapshot(runDirectory: paths.runDirectory)
        if !outgoing.holders.isEmpty || !outgoing.waiting.isEmpty {
            print("outgoing migrations: \(outgoing.holders.count) running, \(outgoing.waiting.count) queued (at most \(OutgoingSlot.limitFromEnvironment), FERRY_MAX_OUTGOING_MIGRATIONS)")
            for h in outgoing.holders { print("  running  \(h.vm.padding(16)) ferry migrate pid \(h.pid)") }
            for (i, w) in outgoing.waiting.enumerated() {
                print("  queued   \(w.vm.padding(16)) ferry migrate pid \(w.pid), position \(i + 1) of \(outgoing.waiting.count), waiting \(age(w.since))")
            }
        }
    }
}
