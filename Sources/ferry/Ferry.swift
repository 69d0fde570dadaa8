import ArgumentParser
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
            On every host:      ferry serve
            Start a VM:         ferry vm run NAME --memory 2G --cpus 2 --kernel K --initrd I
            Move it:            ferry migrate NAME --to HOST
            Try it on one box:  ferry demo
            """,
        version: FerryVersion.version,
        subcommands: [Serve.self, VM.self, Migrate.self, Drain.self, Status.self, Keygen.self, Guest.self, LabCommand.self, Demo.self, Bench.self, Probe.self])
}

/// Options every command that touches host state shares.
struct HostOptions: ParsableArguments {
    @Option(name: .customLong("state-dir"), help: "Where this host keeps VMs and boot files (default: $FERRY_STATE_DIR or /var/lib/ferry).")
    var stateDirectory: String?

    @Option(name: .customLong("log-level"), help: "Log level: trace, debug, info, notice, warning, error (default: warning; serve: info).")
    var logLevel: Logger.Level?

    var paths: StatePaths {
        stateDirectory.map(StatePaths.init(root:)) ?? .fromEnvironment
    }

    var store: VMStore { VMStore(paths: paths) }

    func logger(_ label: String, default level: Logger.Level = .warning) -> Logger {
        let chosen = logLevel ?? level
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
            LoggingSystem.bootstrap { label in
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
