import ArgumentParser
import FerryIO
import FerryInterfaces
import FerryMigration
import Foundation

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Accept incoming migrations on this host (runs in the foreground; use your service manager).")

    @Option(help: "Address and port to listen on (default: 0.0.0.0:\(Endpoint.defaultPort)).")
    var listen = Endpoint(host: "0.0.0.0", port: Endpoint.defaultPort)

    @Option(name: .customLong("pid-file"), help: "Write the daemon's pid here (default: <state-dir>/run/serve.pid).")
    var pidFile: String?

    @OptionGroup var nicOptions: NICOptions

    @Option(name: .customLong("max-bandwidth"), help: "Most all incoming migrations together may use, shared equally, e.g. 2gbit (default: no limit).")
    var maxBandwidth: Rate?

    @OptionGroup var security: SecurityOptions

    @OptionGroup var host: HostOptions

    func run() throws {
        let keys = try security.keys(for: "serve")
        let logger = host.logger("ferry.serve", default: .info)
        let paths = host.paths
        try paths.ensure()
        let server: MigrationServer
        do {
            var options = MigrationServer.Options(host: listen.host, port: listen.port)
            options.nics = nicOptions.nics ?? .all
            options.nicSpeeds = NICSpeeds.resolve(nicOptions.nicSpeed)
            options.maxBandwidthBytesPerSecond = maxBandwidth?.bytesPerSecond
            options.keys = keys
            server = try MigrationServer(store: host.store, options: options, logger: logger)
        } catch {
            throw UserError("cannot listen on \(listen.host):\(listen.port): \(error)")
        }
        server.reconcile()
        let pidPath = pidFile ?? paths.runDirectory + "/serve.pid"
        try "\(getpid())\n".write(toFile: pidPath, atomically: true, encoding: .utf8)
        signal(SIGPIPE, SIG_IGN)
        print("ferry serve: listening on \(listen.host):\(server.port) (state in \(paths.root); "
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
        if let text = try? String(contentsOfFile: pidPath, encoding: .utf8), let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)),
           ProcessStats.isAlive(pid: pid), ProcessStats.commandLine(pid: pid)?.contains("serve") == true {
            print("ferry serve: running (pid \(pid))")
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
        let records = host.store.list()
        print("VMs: \(records.count)" + (records.isEmpty ? "" : " (" + records.map { "\($0.spec.name) \($0.alive ? $0.state.phase.rawValue : "dead")" }.joined(separator: ", ") + ")"))
    }
}
