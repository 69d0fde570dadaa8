import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import Foundation

/// `ferry bench --scenario drain`: four guests leave host a for b and c, two ways, in one
/// lab of three hosts (2 NICs each at 1 Gbit/s, through a switch per NIC):
///
/// - `ferry drain --to b,c` (its defaults: two migrations at once, one per destination);
/// - the peer: the same four moved back to a with `ferry migrate`, one after another, as an
///   operator without a drain command would.
///
/// Each repeat does both, so the guests end where they started. Measured: each way's wall
/// time from the first command to the last VM running at its destination, and the bytes
/// carried; the ratio drain / one-after-another is the figure (issue 19: at most 1, and less
/// where the CPU allows two migrations at once).
public struct DrainBench: Sendable {
    public static let scenarioName = "drain"
    public static let summary = "drain four guests from a to b and c (ferry drain) against moving them one after another (ferry migrate), 3 hosts, 2 x 1 Gbit/s each"

    public struct Run: Codable, Sendable {
        public var iteration: Int
        /// "drain" or "one-after-another".
        public var mode: String
        public var succeeded: Bool
        public var error: String?
        public var seconds: Double
        public var moved: Int
        public var streamBytes: UInt64
    }

    public struct Result: Codable, Sendable {
        public var scenario = DrainBench.scenarioName
        public var qemuVersion: String
        public var memoryMiB: Int
        public var runs: [Run]
    }

    public var memoryMiB: Int
    public var repeats: Int
    public var binary: String
    public var guest: GuestImage
    public var log: @Sendable (String) -> Void

    public init(memoryMiB: Int = 1024, repeats: Int, binary: String, guest: GuestImage, log: @escaping @Sendable (String) -> Void) {
        self.memoryMiB = memoryMiB
        self.repeats = repeats
        self.binary = binary
        self.guest = guest
        self.log = log
    }

    static let vms = ["dr1", "dr2", "dr3", "dr4"]

    public func run() throws -> Result {
        let lab = Lab(name: "fbd\(getpid() % 10000)")
        try lab.up(nics: 2, rate: "1gbit", hosts: 3)
        let serving = try ServingLab(lab, binary: binary)
        defer { serving.close() }
        let hosts = serving.hosts
        let fill = max(64, memoryMiB * 3 / 4)
        for vm in Self.vms {
            let started = try hosts["a"]!.ferry(["vm", "run", vm, "--memory", "\(memoryMiB)M", "--cpus", "1",
                                                 "--kernel", guest.kernel, "--initrd", guest.initrd,
                                                 "--append", GuestImage.append(fillMiB: fill, dirtyMiBPerSecond: 0)])
            guard started.succeeded else { throw BenchError("cannot start \(vm): \(started.stderr)") }
        }
        for vm in Self.vms {
            let console = GuestConsole(path: try hosts["a"]!.store.record(vm).paths.serialLog)
            guard console.wait(timeout: .seconds(180), { $0.contains("FERRY-READY") }) else {
                throw BenchError("\(vm) did not fill its memory in time: \(console.text.suffix(400))")
            }
        }
        log("drain: four \(memoryMiB) MiB guests ready on a (\(fill) MiB filled each)")
        let destinations = ["b", "c"].map { lab.address($0, nic: 0) }.joined(separator: ",")
        var runs: [Run] = []
        for iteration in 1...repeats {
            // The drain.
            let reportPath = lab.directory + "/drain-\(iteration).json"
            var clock = ContinuousClock.now
            let drained = try hosts["a"]!.ferry(["drain", "--to", destinations, "--quiet", "--report-file", reportPath])
            var seconds = (ContinuousClock.now - clock).seconds
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            let report = FileManager.default.contents(atPath: reportPath).flatMap { try? decoder.decode(DrainReport.self, from: $0) }
            let placed = report?.entries.map { ($0.vm, $0.destination) } ?? []
            runs.append(Run(iteration: iteration, mode: "drain", succeeded: drained.succeeded && report?.moved == Self.vms.count,
                            error: drained.succeeded ? nil : drained.stdout + drained.stderr, seconds: seconds, moved: report?.moved ?? 0,
                            streamBytes: report?.entries.compactMap(\.report).reduce(0) { $0 + $1.streamBytes } ?? 0))
            log(String(format: "drain #%d: %@ in %.1f s", iteration, runs.last!.succeeded ? "4 moved" : "FAILED", seconds))
            guard runs.last!.succeeded else { break }
            // The peer: back to a, one after another.
            clock = ContinuousClock.now
            var moved = 0, bytes: UInt64 = 0, error: String?
            for (vm, host) in placed {
                let path = lab.directory + "/back-\(vm)-\(iteration).json"
                let result = try hosts[host]!.ferry(["migrate", vm, "--to", lab.address("a", nic: 0), "--quiet", "--report-file", path])
                let r = FileManager.default.contents(atPath: path).flatMap { try? decoder.decode(MigrationReport.self, from: $0) }
                if result.succeeded, let r { moved += 1; bytes += r.streamBytes } else { error = error ?? (result.stdout + result.stderr) }
            }
            seconds = (ContinuousClock.now - clock).seconds
            runs.append(Run(iteration: iteration, mode: "one-after-another", succeeded: moved == Self.vms.count, error: error,
                            seconds: seconds, moved: moved, streamBytes: bytes))
            log(String(format: "one after another #%d: %d moved in %.1f s", iteration, moved, seconds))
            guard moved == Self.vms.count else { break }
        }
        return Result(qemuVersion: QEMU.version(), memoryMiB: memoryMiB, runs: runs)
    }
}

extension DrainBench.Result {
    public var markdown: String {
        func median(_ values: [Double]) -> Double? { values.isEmpty ? nil : values.sorted()[values.count / 2] }
        let drain = runs.filter { $0.mode == "drain" && $0.succeeded }.map(\.seconds)
        let serial = runs.filter { $0.mode == "one-after-another" && $0.succeeded }.map(\.seconds)
        var lines = [
            "### \(scenario): \(DrainBench.summary), \(memoryMiB) MiB guests (QEMU \(qemuVersion))",
            "",
            "| mode | ok | time, median (s) | runs (s) | moved per run |",
            "|---|---|---|---|---|",
        ]
        for (mode, times) in [("ferry drain", drain), ("ferry migrate, one after another", serial)] {
            let all = runs.filter { $0.mode == (mode == "ferry drain" ? "drain" : "one-after-another") }
            lines.append("| \(mode) | \(all.filter(\.succeeded).count)/\(all.count) | \(median(times).map { String(format: "%.1f", $0) } ?? "-") | "
                         + all.map { String(format: "%.1f", $0.seconds) }.joined(separator: ", ") + " | "
                         + (all.first.map { "\($0.moved) VMs, \(Format.bytes($0.streamBytes))" } ?? "-") + " |")
        }
        if let d = median(drain), let s = median(serial), s > 0 {
            lines.append("")
            lines.append(String(format: "Drain / one after another: **%.2f** (medians).", d / s))
        }
        return lines.joined(separator: "\n")
    }
}

/// A bench's lab with `ferry serve` on every host: each host's ``LabHost`` by name, and
/// ``close()``, which stops the daemons and takes the lab down.
struct ServingLab {
    let lab: Lab
    let hosts: [String: LabHost]
    private let daemons: [Int32]

    /// Starts a daemon on every host of `lab` (up already); if one does not start, stops
    /// those that did and takes the lab down.
    init(_ lab: Lab, binary: String) throws {
        self.lab = lab
        hosts = Dictionary(uniqueKeysWithValues: lab.hosts.map { ($0, LabHost(lab: lab, host: $0, binary: binary)) })
        var started: [Int32] = []
        do {
            for host in lab.hosts { started.append(try hosts[host]!.startServe()) }
        } catch {
            for pid in started { ProcessStats.terminate(pid: pid) }
            try? lab.down()
            throw error
        }
        daemons = started
    }

    func close() {
        for pid in daemons { ProcessStats.terminate(pid: pid) }
        try? lab.down()
    }
}
