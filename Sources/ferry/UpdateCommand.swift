import ArgumentParser
import FerryIO
import FerryMetrics
import FerryMigration
import FerryVM
import FerryWire
import Foundation

extension VM {
    struct Update: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Restart a running VM under a new QEMU on this host, keeping its RAM in place.",
            discussion: """
                A second QEMU (--qemu, by default the one FERRY_QEMU or PATH names now) maps the
                VM's memory file and takes over its device state from the running QEMU over a
                Unix socket (QEMU's x-ignore-shared): no RAM is copied, so it takes about the
                same time whatever the VM's size. The VM runs in the old QEMU until the new one
                has everything; if anything fails before the switchover it stays there. Same as
                `ferry migrate NAME --to localhost`. No daemon needed. Exit status: 0 updated,
                1 failed (the VM runs in its old QEMU), 3 uncertain (see the report).
                """)

        @Argument(help: "The VM to update.")
        var name: String

        @Option(help: "The QEMU binary to move the VM to (default: $FERRY_QEMU or qemu-system-x86_64 from PATH).")
        var qemu: String?

        @OptionGroup var updateOptions: UpdateArguments

        @OptionGroup var host: HostOptions

        func validate() throws {
            if let problem = VMSpec.validateName(name) { throw ValidationError(problem) }
            if let qemu { try UpdateArguments.checkBinary(qemu) }
        }

        func run() throws {
            signal(SIGPIPE, SIG_IGN)
            try UpdateArguments.perform(name: name, qemu: qemu, host: host, timeout: updateOptions.timeout.duration,
                                        output: updateOptions.output)
        }
    }
}

/// What `ferry vm update` and `ferry migrate --to localhost` share.
struct UpdateArguments: ParsableArguments {
    @Option(help: "Give up (the VM stays in its QEMU) after this long (default: 60s).")
    var timeout = DurationArgument(.seconds(60))

    @OptionGroup var output: ReportOptions

    static func checkBinary(_ path: String) throws {
        let found = path.contains("/") ? FileManager.default.isExecutableFile(atPath: path) : Command.exists(path)
        guard found else {
            throw ValidationError("--qemu: '\(path)' is not an executable file")
        }
    }

    /// Runs the update, prints the report and exits as `ferry migrate` does.
    static func perform(name: String, qemu: String?, host: HostOptions, timeout: Duration, downtime: Duration = .milliseconds(300),
                        output: ReportOptions, progressFile: String? = nil) throws {
        // A VM that is not here is a plain mistake, not an update that failed: say so,
        // exit 1, and print no report (the update would report "vm -> vm").
        do {
            _ = try host.store.record(name)
        } catch {
            throw UserError("\(error)")
        }
        var options = UpdateOptions(qemuBinary: qemu ?? QEMU.binary)
        options.timeout = timeout
        options.downtimeLimit = downtime
        let display = ProgressDisplay(enabled: !output.quiet, jsonPath: progressFile)
        let update = SameHostUpdate(store: host.store, name: name, options: options, logger: host.logger("ferry.update")) { progress in
            display.show(progress)
        }
        let metrics = MetricsReporter(paths: host.paths)
        metrics.started(vm: name, role: .update)
        let report = update.run()
        metrics.ended(report: report, role: .update)
        display.finish()
        try output.deliver(report)
    }
}

/// How `ferry migrate` and `ferry vm update` hand over their report: the flags, then the
/// report file, the report on stdout and the exit status by outcome.
struct ReportOptions: ParsableArguments {
    @Flag(help: "Print the report as JSON on stdout.")
    var json = false

    @Option(name: .customLong("report-file"), help: "Also write the JSON report to this file.")
    var reportFile: String?

    @Flag(name: .shortAndLong, help: "No progress display.")
    var quiet = false

    /// Writes the report file (if asked), prints the report and exits with the outcome's
    /// status: 0 succeeded, 1 failed (the VM stays or died on the source), 3 uncertain,
    /// 4 cancelled.
    func deliver(_ report: MigrationReport) throws {
        if let reportFile {
            try report.json.write(toFile: reportFile, atomically: true, encoding: .utf8)
        }
        print(json ? report.json : report.text)
        switch report.outcome {
        case .succeeded: return
        case .failedVMOnSource, .vmDied: throw ExitCode(1)
        case .uncertain: throw ExitCode(3)
        case .cancelled: throw ExitCode(4)
        }
    }
}

extension Endpoint {
    /// `--to` names this host (localhost, 127.x.y.z, ::1): a same-host update, not a
    /// network migration.
    var isThisHost: Bool {
        let h = host.lowercased()
        if h == "localhost" || h == "::1" || h == "0:0:0:0:0:0:0:1" { return true }
        let octets = h.split(separator: ".", omittingEmptySubsequences: false)
        return octets.count == 4 && octets[0] == "127" && octets.allSatisfy { UInt8($0) != nil }
    }
}
