import ArgumentParser
import FerryConfig
import FerryIO
import FerryMigration
import FerryVM
import Foundation
import Logging

@main
struct Ferry: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ferry",
        abstract: "Live-migrates QEMU/KVM virtual machines over every NIC between two hosts.",
        discussion: """
            Once per cluster:   ferry keygen   (then copy /etc/ferry/cluster.key to every host)
            On every host:      ferry serve   (settings: /etc/ferry/ferry.conf, see `ferry config show`)
            Start a VM:         ferry vm run NAME --memory 2G --cpus 2 --kernel K --initrd I
            Move it:            ferry migrate NAME --to HOST
            Try it on one box:  ferry demo
            """,
        version: FerryVersion.version,
        subcommands: [Serve.self, VM.self, Migrate.self, Drain.self, Status.self, Keygen.self, ConfigCommand.self, Guest.self, LabCommand.self, Demo.self, Bench.self, Probe.self, QMPRelayCommand.self])

    /// The host configuration file first (its settings become environment variables the
    /// options fall back to), then the usual parsing.
    static func main() {
        HostConfig.bootstrap(arguments: Array(CommandLine.arguments.dropFirst()))
        main(nil)
    }
}

/// Options every command that touches host state shares.
struct HostOptions: ParsableArguments {
    @Option(name: .customLong("state-dir"), help: "Where this host keeps VMs and boot files (default: $FERRY_STATE_DIR or /var/lib/ferry).")
    var stateDirectory: String?

    @Option(name: .customLong("log-level"), help: "Log level: trace, debug, info, notice, warning, error (default: $FERRY_LOG_LEVEL, else warning; serve: info).")
    var logLevel: Logger.Level?

    @Option(name: .customLong("config"), help: "The host configuration file (default: $FERRY_CONFIG or \(ConfigKey.defaultFile); see `ferry config`).")
    var configFile: String?

    /// A configuration file with errors stops every command that reads host settings.
    func validate() throws {
        if let failure = HostConfig.failure { throw UserError(failure) }
        _ = try EnvironmentSettings.checked("FERRY_LOG_LEVEL", Logger.Level.init(rawValue:))
    }

    var paths: StatePaths {
        stateDirectory.map(StatePaths.init(root:)) ?? .fromEnvironment
    }

    var store: VMStore { VMStore(paths: paths) }

    func logger(_ label: String, default level: Logger.Level = .warning) -> Logger {
        let fromEnvironment = EnvironmentSettings.value("FERRY_LOG_LEVEL").flatMap(Logger.Level.init(rawValue:))
        let chosen = logLevel ?? fromEnvironment ?? level
        LoggingOnce.bootstrap(level: chosen)
        var logger = Logger(label: label)
        logger.logLevel = chosen
        return logger
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

enum LoggingOnce {
    private static let done = Locked(false)
    static func bootstrap(level: Logger.Level) {
        let first = done.withLock { d -> Bool in
            defer { d = true }
            return !d
        }
        if first {
            let journal = JournalLogHandler.standardErrorIsJournal
            LoggingSystem.bootstrap { label in
                if journal { return JournalLogHandler(label: label, logLevel: level) }
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
        }
    }
}

/// An error for the operator: printed as is, exit status 1.
struct UserError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
