import FerryIO
import FerryLab
import FerryLibvirt
import FerryVM
import Foundation

/// `ferry bench --scenario libvirt`: one libvirt domain moved back and forth between the
/// hosts of a lab with a libvirtd each (`ferry lab up --libvirt`, 2 NICs at 1 Gbit/s), by
/// libvirt's own migration and by libvirt over Ferry:
///
/// - `virsh migrate --live --p2p` over plain TCP to the destination's address on NIC 0,
///   one stream, and the same with `--parallel` (2 connections);
/// - `ferry migrate --libvirt` (its defaults: every NIC, encrypted), one stream and with
///   `--parallel 2`;
/// - with `--disk`: every mode also copies the domain's disk (libvirt's
///   `--copy-storage-all`, NBD over TCP or through Ferry), which holds that much data.
///
/// Each run is one leg (a to b, then b to a, ...); the domain is persistent on both hosts.
/// Measured from libvirt's account of the completed job on the source: the bytes it sent
/// (memory and disk) over its elapsed time, and the guest's downtime; and the wall time of
/// the command. The figures (issue 16): Ferry's rate as a share of both NICs' line rate,
/// and against libvirt's TCP migration over one NIC.
public struct LibvirtBench: Sendable {
    public static let scenarioName = "libvirt"
    /// The same with a disk of 1 GiB of data copied each run (`--copy-storage`).
    public static let diskScenarioName = "libvirt-disk"
    public static let summary = "a libvirt domain moved by virsh migrate --p2p over TCP (one NIC) and by ferry migrate --libvirt (both NICs), 2 x 1 Gbit/s"

    public enum Mode: String, Codable, Sendable, CaseIterable {
        case tcp = "libvirt-tcp"
        case tcpParallel = "libvirt-tcp-parallel"
        case ferry = "libvirt-ferry"
        case ferryParallel = "libvirt-ferry-parallel"

        var label: String {
            switch self {
            case .tcp: return "virsh migrate --live --p2p, TCP, one NIC"
            case .tcpParallel: return "virsh migrate --live --p2p --parallel (2), TCP, one NIC"
            case .ferry: return "ferry migrate --libvirt (both NICs, AES-256-GCM)"
            case .ferryParallel: return "ferry migrate --libvirt --parallel 2"
            }
        }
    }

    public struct Run: Codable, Sendable {
        public var iteration: Int
        public var mode: Mode
        public var from: String
        public var succeeded: Bool
        public var error: String?
        /// The command's wall time.
        public var seconds: Double
        /// libvirt's completed job: bytes sent (memory and disk), its elapsed time, the downtime.
        public var dataBytes: UInt64?
        public var diskBytes: UInt64?
        public var libvirtMilliseconds: UInt64?
        public var downtimeMilliseconds: UInt64?
        /// The source's NICs while the bytes flowed (1% to 99% of them; ``NICSampler``).
        public var wireBitsPerSecond: Double?
        /// dataBytes over libvirt's elapsed time.
        public var bitsPerSecond: Double? {
            guard let dataBytes, let ms = libvirtMilliseconds, ms > 0 else { return nil }
            return Double(dataBytes) * 8 / (Double(ms) / 1000)
        }
    }

    public struct Result: Codable, Sendable {
        public var scenario: String
        public var qemuVersion: String
        public var libvirtVersion: String
        public var memoryMiB: Int
        public var fillMiB: Int
        public var diskMiB: Int
        public var lineRateBitsPerSecond: Double
        public var runs: [Run]
    }

    public var memoryMiB: Int
    public var diskMiB: Int
    public var repeats: Int
    public var binary: String
    public var guest: GuestImage
    public var log: @Sendable (String) -> Void

    public init(memoryMiB: Int = 1024, diskMiB: Int = 0, repeats: Int, binary: String, guest: GuestImage, log: @escaping @Sendable (String) -> Void) {
        self.memoryMiB = memoryMiB
        self.diskMiB = diskMiB
        self.repeats = repeats
        self.binary = binary
        self.guest = guest
        self.log = log
    }

    static let domain = "bench"

    public func run() throws -> Result {
        if let missing = LabLibvirt.missing { throw BenchError(missing) }
        let lab = Lab(name: "fbl\(getpid() % 10000)")
        try lab.up(nics: 2, rate: "1gbit", hosts: 2, libvirt: true)
        let lv = LabLibvirt(lab: lab)
        let serving = try ServingLab(lab, binary: binary)
        defer { serving.close() }
        let hosts = serving.hosts
        let libvirt = try Libvirt.load()

        // The domain: RAM three quarters filled with incompressible data, then idle (a
        // bounded verification rate), so that each run moves the same bytes.
        let fill = memoryMiB * 3 / 4
        let shared = lv.sharedDirectory
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        let image: String
        if diskMiB > 0 {
            // A disk of its own on each host (copied each run), its data incompressible.
            image = "/var/lib/libvirt/images/\(Self.domain).qcow2"
            for host in lab.hosts {
                let outside = lv.root(host) + "/lib/images/\(Self.domain).qcow2"
                try FileManager.default.createDirectory(atPath: (outside as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
                try Command.check(["qemu-img", "create", "-q", "-f", "qcow2", outside, "\(diskMiB * 2)M"])
            }
            let data = lv.root("a") + "/lib/images/\(Self.domain).qcow2"
            try Command.check(["bash", "-c", "head -c \(diskMiB)M /dev/urandom > \(shared)/data.raw && qemu-img convert -n -f raw -O qcow2 \(shared)/data.raw \(data) && rm -f \(shared)/data.raw"])
        } else {
            image = "\(shared)/\(Self.domain).qcow2"
            try Command.check(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"])
        }
        let xml = lv.domainXML(name: Self.domain, memoryMiB: memoryMiB, kernel: guest.kernel, initrd: guest.initrd,
                               cmdline: GuestImage.append(fillMiB: fill, dirtyMiBPerSecond: 0, verifyMiBPerSecond: 32),
                               image: image, console: "\(shared)/\(Self.domain).console", mac: "52:54:00:00:30:01")
        try Data(xml.utf8).write(to: URL(fileURLWithPath: "\(shared)/\(Self.domain).xml"))
        // Defined on a; --persistent defines it on b with its first migration (the same UUID).
        let defined = try Command.run(["virsh", "-c", lv.uri("a"), "define", "\(shared)/\(Self.domain).xml"])
        guard defined.succeeded else { throw BenchError("virsh define: \(defined.stderr)") }
        let started = try Command.run(["virsh", "-c", lv.uri("a"), "start", Self.domain])
        guard started.succeeded else { throw BenchError("virsh start: \(started.stderr)") }
        let console = GuestConsole(path: "\(shared)/\(Self.domain).console")
        guard console.wait(timeout: .seconds(180), { $0.contains("FERRY-READY") }) else {
            throw BenchError("the domain did not fill its memory in time: \(console.text.suffix(400))")
        }
        log("libvirt: domain \(Self.domain) ready on a (\(memoryMiB) MiB, \(fill) MiB filled)" + (diskMiB > 0 ? ", a disk with \(diskMiB) MiB of data" : ""))

        var runs: [Run] = []
        var here = "a"
        for iteration in 1...repeats {
            for mode in Mode.allCases {
                let there = here == "a" ? "b" : "a"
                var run = Run(iteration: iteration, mode: mode, from: here, succeeded: false, seconds: 0)
                let sampler = lv.daemonPID(here).map { NICSampler(pid: $0, nics: (0..<2).map { lab.interface(nic: $0) }) }
                let clock = ContinuousClock.now
                let result: CommandResult
                switch mode {
                case .tcp, .tcpParallel:
                    // The source libvirtd reaches the destination's through its socket (the
                    // lab's hosts see each other's files); QEMU's stream goes over NIC 0.
                    var args = ["virsh", "-c", lv.uri(here), "migrate", "--live", "--p2p", "--persistent", "--unsafe", Self.domain,
                                "qemu+unix:///system?socket=\(lv.socket(there))", "--migrateuri", "tcp://\(lab.address(there, nic: 0))"]
                    if mode == .tcpParallel { args += ["--parallel", "--parallel-connections", "2"] }
                    if diskMiB > 0 { args += ["--copy-storage-all"] }
                    result = try Command.run(args)
                case .ferry, .ferryParallel:
                    var args = ["migrate", Self.domain, "--to", lab.address(there, nic: 0), "--libvirt", "--persistent", "--unsafe", "--quiet"]
                    if mode == .ferryParallel { args += ["--parallel", "2"] }
                    if diskMiB > 0 { args += ["--copy-storage"] }
                    result = try hosts[here]!.ferry(args)
                }
                run.seconds = (ContinuousClock.now - clock).seconds
                sampler?.stop()
                run.wireBitsPerSecond = sampler?.streamingBitsPerSecond
                run.succeeded = result.succeeded
                if !result.succeeded { run.error = String((result.stdout + result.stderr).suffix(600)) }
                if let stats = try? libvirt.connect(lv.uri(here)).domain(Self.domain).jobStatistics(completed: true) {
                    run.dataBytes = stats.dataProcessed
                    run.diskBytes = stats.diskProcessed
                    run.libvirtMilliseconds = stats.elapsedMilliseconds
                    run.downtimeMilliseconds = stats.downtimeMilliseconds
                }
                runs.append(run)
                log(String(format: "%@ #%d %@ -> %@: %@ in %.1f s%@%@", mode.rawValue, iteration, here, there,
                           run.succeeded ? "ok" : "FAILED", run.seconds,
                           run.wireBitsPerSecond.map { String(format: ", NICs %.2f Gbit/s", $0 / 1e9) } ?? "",
                           run.bitsPerSecond.map { String(format: ", libvirt's job %.2f Gbit/s", $0 / 1e9) } ?? ""))
                if run.succeeded { here = there } else { log(run.error ?? "") }
            }
        }
        return Result(scenario: diskMiB > 0 ? Self.diskScenarioName : Self.scenarioName, qemuVersion: QEMU.version(), libvirtVersion: libvirt.libraryVersion, memoryMiB: memoryMiB, fillMiB: fill,
                      diskMiB: diskMiB, lineRateBitsPerSecond: 2e9, runs: runs)
    }
}

extension LibvirtBench.Result {
    public var markdown: String {
        func median(_ values: [Double]) -> Double? { values.isEmpty ? nil : values.sorted()[values.count / 2] }
        var lines = [
            "### \(scenario): \(LibvirtBench.summary); \(memoryMiB) MiB domain, \(fillMiB) MiB filled"
                + (diskMiB > 0 ? ", disk with \(diskMiB) MiB copied" : "") + " (QEMU \(qemuVersion), libvirt \(libvirtVersion))",
            "",
            "| mode | ok | on the NICs, median | of 2 x 1 Gbit/s | libvirt's job (its bytes / its time), median | wall time, median (s) | runs on the NICs (Gbit/s) |",
            "|---|---|---|---|---|---|---|",
        ]
        var rates: [LibvirtBench.Mode: Double] = [:]
        for mode in LibvirtBench.Mode.allCases {
            let all = runs.filter { $0.mode == mode }
            let ok = all.filter(\.succeeded)
            let wire = median(ok.compactMap(\.wireBitsPerSecond))
            let job = median(ok.compactMap(\.bitsPerSecond))
            rates[mode] = wire
            lines.append("| \(mode.label) | \(ok.count)/\(all.count) | \(wire.map { String(format: "%.2f Gbit/s", $0 / 1e9) } ?? "-") | "
                         + "\(wire.map { String(format: "%.2f", $0 / lineRateBitsPerSecond) } ?? "-") | "
                         + "\(job.map { String(format: "%.2f Gbit/s", $0 / 1e9) } ?? "-") | "
                         + "\(median(ok.map(\.seconds)).map { String(format: "%.1f", $0) } ?? "-") | "
                         + ok.compactMap { $0.wireBitsPerSecond.map { String(format: "%.2f", $0 / 1e9) } }.joined(separator: ", ") + " |")
        }
        if let f = rates[.ferry], let t = rates[.tcp], t > 0 {
            lines.append("")
            var line = String(format: "On the NICs, libvirt over Ferry / libvirt over TCP (one stream each): **%.2f**", f / t)
            if let fp = rates[.ferryParallel], let tp = rates[.tcpParallel], tp > 0 {
                line += String(format: "; with --parallel: **%.2f**", fp / tp)
            }
            lines.append(line + " (medians).")
        }
        return lines.joined(separator: "\n")
    }
}
