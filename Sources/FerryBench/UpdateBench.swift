import FerryIO
import FerryMigration
import FerryVM
import Foundation

/// `ferry bench --scenario same-host-update`: same-host updates (`ferry vm update`) of
/// guests of several sizes, each filled with data it keeps checking, timed end to end.
///
/// No lab is needed: the VMs run in a state directory of their own on this host. What is
/// measured per update: the command's total time (process start to exit, as an operator
/// waits for it), the report's total time, QEMU's downtime, the guest's pause (QEMU's STOP
/// to the new QEMU's `cont`), the largest gap between guest heartbeats, and the CPU-seconds
/// of the update process (getrusage of the child) and of both QEMUs. The goal (issue 7):
/// 4 GiB in <= 1 s with <= 100 ms downtime, and 1 GiB within 20% of that.
public struct UpdateBench: Sendable {
    public static let scenarioName = "same-host-update"
    public static let summary = "same-host update (vm update, RAM kept in place) of 1 GiB and 4 GiB guests"

    public struct Run: Codable, Sendable {
        public var memoryMiB: Int
        public var iteration: Int
        public var succeeded: Bool
        public var error: String?
        /// `ferry vm update` from start to exit.
        public var commandSeconds: Double
        public var reportSeconds: Double?
        public var qemuDowntimeMilliseconds: Double?
        public var guestPausedMilliseconds: Double?
        public var heartbeatGapMilliseconds: Double
        public var guestOK: Bool
        /// The update process's own CPU time, user + system (getrusage of the child).
        public var updateCPUSeconds: Double
        public var oldQEMUCPUSeconds: Double?
        public var newQEMUCPUSeconds: Double?
        public var streamBytes: UInt64
    }

    public struct Result: Codable, Sendable {
        public var scenario = UpdateBench.scenarioName
        public var qemuVersion: String
        public var runs: [Run]
    }

    public var sizesMiB: [Int]
    public var repeats: Int
    public var binary: String
    public var guest: GuestImage
    public var log: @Sendable (String) -> Void

    public init(sizesMiB: [Int] = [1024, 4096], repeats: Int, binary: String, guest: GuestImage,
                log: @escaping @Sendable (String) -> Void) {
        self.sizesMiB = sizesMiB
        self.repeats = repeats
        self.binary = binary
        self.guest = guest
        self.log = log
    }

    public func run() throws -> Result {
        let root = "/run/ferry-bench-update-\(getpid())"
        let store = VMStore(paths: StatePaths(root: root))
        defer {
            for record in store.list() { try? store.stop(record.spec.name) }
            try? FileManager.default.removeItem(atPath: root)
            try? FileManager.default.removeItem(atPath: store.paths.memoryDirectory)
        }
        var runs: [Run] = []
        for size in sizesMiB {
            let name = "upd\(size)"
            // The workload fills most of the RAM with random data, leaving the guest kernel room
            // (3840 of 4096 MiB got the workload OOM-killed; 768 of 1024 and 3456 of 4096 fit).
            let fill = max(64, size * 7 / 8 - 128)
            let started = try Command.run([binary, "vm", "run", name, "--state-dir", root, "--memory", "\(size)M", "--cpus", "2",
                                           "--kernel", guest.kernel, "--initrd", guest.initrd,
                                           "--append", GuestImage.append(fillMiB: fill, dirtyMiBPerSecond: 8)])
            guard started.succeeded else { throw BenchError("cannot start the \(size) MiB guest: \(started.stderr)") }
            let paths = store.vmPaths(name)
            let console = GuestConsole(path: paths.serialLog)
            let ready = console.wait(timeout: .seconds(60 + fill / 100)) { $0.contains("FERRY-READY") || $0.contains("FERRY-WORKLOAD-EXIT") }
            guard ready && !console.text.contains("FERRY-WORKLOAD-EXIT") else {
                throw BenchError("the \(size) MiB guest did not fill its memory in time: \(console.text.suffix(400))")
            }
            log("update: \(size) MiB guest ready (\(fill) MiB filled)")
            for iteration in 1...repeats {
                let run = try update(name, size: size, iteration: iteration, root: root, paths: paths)
                runs.append(run)
                log(String(format: "update: %d MiB #%d: %@ in %.3f s, downtime %@ ms, guest paused %@ ms, update CPU %.3f s",
                           size, iteration, run.succeeded ? "ok" : "FAILED", run.commandSeconds,
                           run.qemuDowntimeMilliseconds.map { String(format: "%.0f", $0) } ?? "?",
                           run.guestPausedMilliseconds.map { String(format: "%.0f", $0) } ?? "?", run.updateCPUSeconds))
            }
            try? store.stop(name)
        }
        return Result(qemuVersion: QEMU.version(), runs: runs)
    }

    private func update(_ name: String, size: Int, iteration: Int, root: String, paths: VMPaths) throws -> Run {
        let watcher = HeartbeatWatcher(paths: [paths.serialLog])
        Thread.sleep(forTimeInterval: 1)
        let reportPath = root + "/report.json"
        try? FileManager.default.removeItem(atPath: reportPath)
        let cpuBefore = Self.childrenCPUSeconds()
        let clock = ContinuousClock.now
        let result = try Command.run([binary, "vm", "update", name, "--state-dir", root, "--quiet", "--report-file", reportPath])
        let seconds = (ContinuousClock.now - clock).seconds
        let cpu = Self.childrenCPUSeconds() - cpuBefore
        Thread.sleep(forTimeInterval: 1.5)
        watcher.stop()
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let report = FileManager.default.contents(atPath: reportPath).flatMap { try? decoder.decode(MigrationReport.self, from: $0) }
        let guestOK = !watcher.sawErrors && watcher.heartbeatCount > 5 && !watcher.sequenceWentBack
        return Run(memoryMiB: size, iteration: iteration, succeeded: result.succeeded && report?.outcome == .succeeded,
                   error: result.succeeded ? nil : (report?.error ?? result.stderr), commandSeconds: seconds,
                   reportSeconds: report?.totalSeconds, qemuDowntimeMilliseconds: report?.qemuDowntimeMilliseconds,
                   guestPausedMilliseconds: report?.switchoverMilliseconds, heartbeatGapMilliseconds: watcher.largestGapSeconds * 1000,
                   guestOK: guestOK, updateCPUSeconds: cpu, oldQEMUCPUSeconds: report?.source.qemuCPUSeconds,
                   newQEMUCPUSeconds: report?.destination.qemuCPUSeconds, streamBytes: report?.streamBytes ?? 0)
    }

    /// CPU time of this process's waited-for children so far (user + system).
    static func childrenCPUSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_CHILDREN.rawValue, &usage)
        func s(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return s(usage.ru_utime) + s(usage.ru_stime)
    }
}

extension UpdateBench.Result {
    /// The table: medians per guest size.
    public var markdown: String {
        /// Seconds with milliseconds, milliseconds whole.
        func median(_ values: [Double], _ format: String = "%.3f") -> String {
            guard !values.isEmpty else { return "-" }
            return String(format: format, values.sorted()[values.count / 2])
        }
        var lines = [
            "### \(scenario): \(UpdateBench.summary) (QEMU \(qemuVersion))",
            "",
            "| guest | ok | command time (s) | report total (s) | QEMU downtime (ms) | guest paused (ms) | heartbeat gap (ms) | update CPU (s) | old QEMU CPU (s) | new QEMU CPU (s) | stream |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for size in Set(runs.map(\.memoryMiB)).sorted() {
            let r = runs.filter { $0.memoryMiB == size }
            let ok = r.filter { $0.succeeded && $0.guestOK }
            lines.append("| \(size >= 1024 ? "\(size / 1024) GiB" : "\(size) MiB") | \(ok.count)/\(r.count) "
                         + "| \(median(ok.map(\.commandSeconds))) | \(median(ok.compactMap(\.reportSeconds))) "
                         + "| \(median(ok.compactMap(\.qemuDowntimeMilliseconds), "%.0f")) | \(median(ok.compactMap(\.guestPausedMilliseconds), "%.0f")) "
                         + "| \(median(ok.map(\.heartbeatGapMilliseconds), "%.0f")) | \(median(ok.map(\.updateCPUSeconds))) "
                         + "| \(median(ok.compactMap(\.oldQEMUCPUSeconds))) | \(median(ok.compactMap(\.newQEMUCPUSeconds))) "
                         + "| \(Format.bytes(UInt64(median(ok.map { Double($0.streamBytes) }, "%.0f")) ?? 0)) |")
        }
        lines.append("")
        lines.append("Medians over the runs that succeeded with the guest's memory check intact. Heartbeat gap: the largest "
                     + "interval between the guest's heartbeats (10 a second) around the update, by the host's clock.")
        return lines.joined(separator: "\n")
    }
}
