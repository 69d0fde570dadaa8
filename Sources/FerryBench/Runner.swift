import FerryIO
import FerryLab
import FerryMigration
import FerryQMP
import FerryVM
import FerryWire
import Foundation

public struct BenchError: Error, CustomStringConvertible {
    public var description: String
    init(_ d: String) { description = d }
}

/// Runs every mode of one scenario in the lab, the same guest for each, and measures.
public final class BenchRunner {
    let scenario: BenchScenario
    let modes: [BenchMode]
    let repeats: Int
    let binary: String
    let guest: GuestImage
    let log: (String) -> Void
    let lab: Lab
    let a: LabHost
    let b: LabHost
    static let qemuPort: UInt16 = 7480
    static let ecmpAddress = "10.77.100.2"

    public init(scenario: BenchScenario, modes: [BenchMode], repeats: Int, binary: String, guest: GuestImage,
                log: @escaping (String) -> Void) {
        self.scenario = scenario
        self.modes = modes
        self.repeats = repeats
        self.binary = binary
        self.guest = guest
        self.log = log
        lab = Lab(name: "bench")
        a = LabHost(lab: lab, host: "a", binary: binary)
        b = LabHost(lab: lab, host: "b", binary: binary)
    }

    public func run() throws -> BenchResult {
        // One bench at a time per machine: its lab has a fixed name, and a second run
        // would tear down the first's lab under it.
        let benchLock = try BenchLock.acquire()
        defer { benchLock.release() }
        if lab.isUp { try lab.down() }
        try lab.up(nics: scenario.nics, rate: scenario.rate)
        defer { try? lab.down() }
        try preparePeers()
        try makeDiskTemplate()
        let servePID = try b.startServe()
        defer { ProcessStats.terminate(pid: servePID) }
        // The insecure mode needs a daemon that runs --insecure too: a second one, on its own port.
        let insecurePID = modes.contains(where: \.isInsecure) ? try b.startServe(port: Self.insecurePort, extra: ["--insecure"]) : nil
        defer { if let insecurePID { ProcessStats.terminate(pid: insecurePID) } }
        // Ping-pong: a receives too; its guest lives across the runs and is stopped at the end.
        let servePIDa = modes.contains(.ferryPingPong) ? try a.startServe() : nil
        defer {
            if let servePIDa { ProcessStats.terminate(pid: servePIDa) }
            for host in [a, b] where (try? host.store.record(Self.pingPongVM)) != nil {
                try? host.store.stop(Self.pingPongVM, reason: "bench")
            }
        }
        var runs: [BenchRun] = []
        let total = repeats * modes.count
        // Modes interleave within each repeat, so that drift on the machine hits all alike.
        for iteration in 0..<repeats {
            for mode in modes {
                log("[\(runs.count + 1)/\(total)] \(scenario.name): \(mode.label), run \(iteration + 1)")
                let run = measure(mode, iteration)
                if run.succeeded {
                    log(String(format: "    %.2f Gbit/s, %.1f s, QEMU downtime %@ ms, guest gap %.0f ms, guest %@",
                               run.throughputBitsPerSecond / 1e9, run.totalSeconds,
                               run.qemuDowntimeMilliseconds.map { String(Int($0)) } ?? "-", run.guestGapMilliseconds,
                               run.guestOK ? "OK" : "FAILED"))
                } else {
                    log("    failed: \(run.error ?? "?")")
                }
                runs.append(run)
            }
        }
        return BenchResult(scenario: scenario, date: Date(), machine: Self.machine, qemuVersion: QEMU.version(),
                           ferryVersion: FerryVersion.software, repeats: repeats, runs: runs)
    }

    /// Where b's `--insecure` daemon listens (the secure one has the default port).
    static let insecurePort: UInt16 = 7471

    static var machine: String {
        let cpu = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?
            .split(separator: "\n").first { $0.hasPrefix("model name") }?
            .split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "unknown CPU"
        return "\(ProcessInfo.processInfo.activeProcessorCount) x \(cpu), \(ProcessInfo.processInfo.physicalMemory >> 30) GiB"
    }

    // MARK: The disk

    /// The guest's disk workload: the scenario's rate of checked 4 KiB writes over its
    /// first 64 MiB.
    var diskAppend: String { " ferry.disk=vda ferry.diskmib=64 ferry.diskrate=\(scenario.diskWriteRate)" }
    var diskTemplate: String { lab.directory + "/bench-disk-template.raw" }

    /// A raw image of the scenario's virtual size, its first `diskMiB` incompressible, made
    /// once per bench; each run's guest gets a sparse copy of it.
    private func makeDiskTemplate() throws {
        guard scenario.diskMiB > 0 else { return }
        log("making the disk image (\(scenario.diskMiB) MiB of data)")
        try Command.check(["truncate", "-s", "\(scenario.virtualDiskMiB)M", diskTemplate])
        try Command.check(["dd", "if=/dev/urandom", "of=\(diskTemplate)", "bs=1M", "count=\(scenario.diskMiB)", "conv=notrunc", "status=none"])
    }

    /// The run's disk: a sparse copy of the template.
    private func makeDisk(_ vm: String) throws -> String {
        let path = lab.directory + "/bench-disk-\(vm).raw"
        try? FileManager.default.removeItem(atPath: path)
        try Command.check(["cp", "--sparse=always", diskTemplate, path])
        return path
    }

    /// Every image of `vm` the bench made or a migration left (each host's copies too).
    private func removeDisks(_ vm: String) {
        try? FileManager.default.removeItem(atPath: lab.directory + "/bench-disk-\(vm).raw")
        for host in [a, b] { try? FileManager.default.removeItem(atPath: host.store.paths.disksDirectory + "/" + vm) }
    }

    // MARK: Peers' plumbing

    /// ECMP: a /32 on b reached through one nexthop per NIC, hashed on layer 4
    /// (fib_multipath_hash_policy=1), as switch-independent teaming spreads flows.
    /// MPTCP: b announces its other NICs' addresses; a accepts them and opens a subflow each.
    private func preparePeers() throws {
        let na = lab.namespace("a"), nb = lab.namespace("b")
        if modes.contains(.qemuECMP) && scenario.nics > 1 {
            let hops = (0..<scenario.nics).flatMap { ["nexthop", "via", lab.address("b", nic: $0), "dev", lab.interface(nic: $0)] }
            let back = (0..<scenario.nics).flatMap { ["nexthop", "via", lab.address("a", nic: $0), "dev", lab.interface(nic: $0)] }
            for ns in [na, nb] {
                try Command.check(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"])
                for key in ["all", "default"] + (0..<scenario.nics).map({ lab.interface(nic: $0) }) {
                    _ = try? Command.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.\(key).rp_filter=0"])
                }
            }
            try Command.check(["ip", "-n", nb, "addr", "add", "\(Self.ecmpAddress)/32", "dev", "lo"])
            try Command.check(["ip", "-n", na, "route", "add", "\(Self.ecmpAddress)/32"] + hops)
            try Command.check(["ip", "-n", nb, "route", "add", "10.77.100.1/32"] + back)
        }
        if modes.contains(.qemuMPTCP) && scenario.nics > 1 {
            guard Command.exists("mptcpize") else { throw BenchError("the MPTCP mode needs mptcpize (apt-get install mptcpize)") }
            let n = String(scenario.nics)
            try Command.check(["ip", "-n", na, "mptcp", "limits", "set", "subflow", n, "add_addr_accepted", n])
            try Command.check(["ip", "-n", nb, "mptcp", "limits", "set", "subflow", n, "add_addr_accepted", n])
            for nic in 1..<scenario.nics {
                try Command.check(["ip", "-n", nb, "mptcp", "endpoint", "add", lab.address("b", nic: nic), "dev", lab.interface(nic: nic), "signal"])
            }
        }
    }

    // MARK: One run

    /// The guest that moves back and forth in the ping-pong mode (the other modes' guest,
    /// "bench", is started afresh for each run).
    static let pingPongVM = "bench-pingpong"

    private func measure(_ mode: BenchMode, _ iteration: Int) -> BenchRun {
        var run = BenchRun(mode: mode, iteration: iteration, succeeded: false, error: nil, totalSeconds: 0, transferSeconds: 0,
                           ramBytes: 0, throughputBitsPerSecond: 0, qemuDowntimeMilliseconds: nil, guestGapMilliseconds: 0,
                           guestOK: false, nicTxBytes: [:], timeline: [], events: [])
        let pingPong = mode == .ferryPingPong
        let vm = pingPong ? Self.pingPongVM : "bench"
        defer {
            if !pingPong {
                for host in [a, b] { if (try? host.store.record(vm)) != nil { try? host.store.stop(vm, reason: "bench") } }
                removeDisks(vm)
            }
        }
        do {
            // Ping-pong: the guest leaves whichever host has it (a, the first time).
            let (from, to) = pingPong && (try? b.store.record(vm)) != nil ? (b, a) : (a, b)
            let source = try (try? from.store.record(vm)) ?? startGuest(vm, mptcp: mode == .qemuMPTCP)
            let before = try nicTxBytes(from)
            let sampler = NICSampler(pid: source.state.pid, nics: (0..<scenario.nics).map { lab.interface(nic: $0) })
            let watcher = HeartbeatWatcher(paths: [source.paths.serialLog])
            defer { watcher.stop() }
            let destinationLog: String
            var destinationPID: Int32?
            defer {
                if let destinationPID {
                    ProcessStats.terminate(pid: destinationPID)
                    // QEMU alone's destination tap is persistent (QEMU opened it by name).
                    for nic in source.spec.nics { _ = try? Command.run(["ip", "-n", lab.namespace("b"), "link", "del", nic.tapName]) }
                }
            }
            // What the VM's users see: the lab's client probes the guest throughout.
            let probe = try? ClientProbe(lab: lab, binary: binary, address: guestAddress(source.spec.name))
            // A guest that keeps writing: its rate alone first, to compare the rate it keeps
            // while it migrates with.
            if scenario.dirtyMiBPerSecond > 0 { Thread.sleep(forTimeInterval: 3) }
            let migrationStart = watcher.now
            // The guest's write rates, whether or not the migration completes.
            defer {
                if scenario.dirtyMiBPerSecond > 0 {
                    let end = watcher.now
                    run.guestWriteMiBPerSecondBefore = watcher.memoryWriteMiBPerSecond(from: 0, to: migrationStart)
                    run.guestWriteMiBPerSecondDuring = watcher.memoryWriteMiBPerSecond(from: migrationStart, to: end)
                }
            }
            if mode.isFerry {
                destinationLog = to.store.vmPaths(vm).serialLog
                watcher.add(path: destinationLog)
                try migrateWithFerry(mode, vm, from: from, to: to, &run)
            } else {
                (destinationLog, destinationPID) = try migrateWithQEMU(mode, source, watcher, &run)
            }
            // The network is back once the guest answers again (a probe that never is says so).
            if let probe { Thread.sleep(forTimeInterval: 1); run.network = try? probe.stop() }
            sampler.stop()
            run.streamingBitsPerSecond = sampler.streamingBitsPerSecond
            let after = try nicTxBytes(from)
            for (nic, bytes) in after { run.nicTxBytes[nic] = bytes &- (before[nic] ?? 0) }
            // The guest at b: heartbeats go on and its memory check holds.
            let console = GuestConsole(path: destinationLog)
            let alive = console.wait(timeout: .seconds(10)) { _ in (console.heartbeats.count) >= 5 }
            run.guestOK = alive && console.heartbeats.allSatisfy(\.ok) && !watcher.sawErrors
            if scenario.diskMiB > 0 {
                // Its disk too: the workload goes on and every block it wrote reads back right.
                let checked = console.wait(timeout: .seconds(10)) { _ in (console.lastDiskStatus?.checked ?? 0) > 0 }
                run.guestOK = run.guestOK && checked && console.lastDiskStatus?.errors == 0
            }
            run.guestGapMilliseconds = watcher.largestGapSeconds * 1000
            if scenario.diskMiB > 0 {
                run.guestDiskWriteMiBPerSecond = watcher.diskWriteMiBPerSecond
                run.guestSlowestDiskWriteMilliseconds = watcher.slowestDiskWriteMilliseconds
            }
            run.succeeded = alive
            if !alive { run.error = "no heartbeats from the guest at b" }
            if !run.guestOK && alive { run.error = "the guest's memory check failed at b" }
        } catch {
            run.error = "\(error)"
        }
        return run
    }

    /// Starts the scenario's guest on a. `mptcp`: under mptcpize, so that QEMU's TCP
    /// sockets are MPTCP sockets (the LD_PRELOAD passes from `ferry vm run` to QEMU).
    private func startGuest(_ vm: String, mptcp: Bool) throws -> VMRecord {
        // Room for the guest kernel beside the filled memory: 256 MiB, plus its page tables
        // and the workload's bookkeeping, which grow with the fill (a 4 GiB fill OOMs in 4.25 GiB).
        // A NIC on the lab's VM network and the guest's echo service, for the client's probe.
        var args = ["vm", "run", vm, "--memory", "\(scenario.fillMiB + 256 + scenario.fillMiB / 8)M", "--cpus", "2",
                                  "--kernel", guest.kernel, "--initrd", guest.initrd,
                                  "--append", GuestImage.append(fillMiB: scenario.fillMiB, dirtyMiBPerSecond: scenario.dirtyMiBPerSecond,
                                                                fill: scenario.fill,
                                                                // A hot guest writes as fast as it can instead of idling.
                                                                verifyMiBPerSecond: scenario.dirtyMiBPerSecond >= 100 ? nil : 32)
                                      + (scenario.diskMiB > 0 ? diskAppend : "")
                                      + " ferry.ip=\(guestAddress(vm))/\(Lab.vmNetworkPrefix)",
                    "--nic", "bridge=\(Lab.vmBridge)"]
        if scenario.diskMiB > 0 { args += ["--disk", try makeDisk(vm)] }
        let result = try Command.run(try lab.execArguments("a", (mptcp ? ["mptcpize", "run"] : []) + [binary] + args))
        guard result.succeeded else { throw BenchError("vm run: \(result.stderr)") }
        let record = try a.store.record(vm)
        let console = GuestConsole(path: record.paths.serialLog)
        guard console.wait(timeout: .seconds(600), poll: .milliseconds(200), { $0.contains("FERRY-READY") }) else {
            throw BenchError("the guest did not finish its fill")
        }
        Thread.sleep(forTimeInterval: 1)
        return record
    }

    /// The bench guest's address on the VM network (the ping-pong one's own: it lives on
    /// while the others come and go).
    func guestAddress(_ vm: String) -> String { lab.guestAddress(vm == Self.pingPongVM ? 1 : 0) }

    private func nicTxBytes(_ host: LabHost) throws -> [String: UInt64] {
        var out: [String: UInt64] = [:]
        for nic in 0..<scenario.nics {
            let name = lab.interface(nic: nic)
            let text = try Command.check(["ip", "netns", "exec", lab.namespace(host.host), "cat", "/sys/class/net/\(name)/statistics/tx_bytes"]).stdout
            out[name] = UInt64(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        }
        return out
    }

    private func migrateWithFerry(_ mode: BenchMode, _ vm: String, from: LabHost, to: LabHost, _ run: inout BenchRun) throws {
        let reportPath = lab.directory + "/bench-report.json"
        try? FileManager.default.removeItem(atPath: reportPath)
        // The insecure mode goes to b's --insecure daemon, on its own port.
        let address = lab.address(to.host, nic: 0)
        let target = mode.isInsecure ? "\(address):\(Self.insecurePort)" : address
        var args = ["migrate", vm, "--to", target, "--report-file", reportPath, "--quiet"]
        if mode.isInsecure { args.append("--insecure") }
        if mode == .ferryZeroCopy || mode == .ferryCopied { args += ["--compress", "none"] }
        if mode == .ferryCopied { args += ["--zero-copy", "off"] }
        if mode == .ferryOneChannel { args += ["--nics", lab.interface(nic: 0), "--channels-per-nic", "1"] }
        if mode == .ferryNoCompression { args += ["--compress", "none"] }
        if mode == .ferryLZ4 { args += ["--compress", "lz4"] }
        if mode == .ferryZstd { args += ["--compress", "zstd"] }
        if mode == .ferryThrottle { args += ["--converge", "throttle"] }
        if mode == .ferryPostcopy { args += ["--converge", "postcopy", "--postcopy", "allowed"] }
        if let cap = scenario.capSeconds { args += ["--timeout", "\(cap)s"] }
        let started = ContinuousClock.now
        let result = try from.ferry(args)
        run.totalSeconds = (ContinuousClock.now - started).seconds
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        guard let data = FileManager.default.contents(atPath: reportPath),
              let report = try? decoder.decode(MigrationReport.self, from: data) else {
            throw BenchError("ferry migrate wrote no report: \(result.stdout.suffix(300))")
        }
        run.events = report.events
        run.postcopy = report.postcopy
        guard report.succeeded else { throw BenchError("ferry migrate failed: \(report.error ?? "?")") }
        // With disks, the transfer starts with their copies.
        let startedAt = report.events.first { $0.what.hasPrefix("copying") || $0.what.hasPrefix("QEMU started migrating") }?.at ?? 0
        let loadedAt = report.events.first { $0.what.hasPrefix("destination loaded") }?.at ?? report.totalSeconds
        run.transferSeconds = loadedAt - startedAt
        run.ramBytes = report.qemuTransferredBytes ?? report.streamBytes
        run.throughputBitsPerSecond = Double(report.streamBytes) * 8 / max(run.transferSeconds, 0.001)
        run.qemuDowntimeMilliseconds = report.qemuDowntimeMilliseconds
        run.guestPauseMilliseconds = report.pause?.guestPauseMilliseconds
        run.pause = report.pause
        run.sourceQEMUCPUSeconds = report.source.qemuCPUSeconds
        run.sourceFerryCPUSeconds = report.source.ferryCPUSeconds
        run.destinationQEMUCPUSeconds = report.destination.qemuCPUSeconds
        run.destinationFerryCPUSeconds = report.destination.ferryCPUSeconds
        run.sourceFerryPeakRSSBytes = report.source.ferryPeakRSSBytes
        run.destinationFerryPeakRSSBytes = report.destination.ferryPeakRSSBytes
        run.timeline = report.timeline
        run.events = report.events
        run.destinationWaits = report.destinationWaits
        run.postcopy = report.postcopy
        if let disks = report.disks, !disks.isEmpty {
            run.diskBytes = disks.compactMap(\.copiedBytes).reduce(0, +)
            run.diskCopySeconds = disks.first?.copySeconds
            // As an operator would once the VM runs at its destination: the source's image goes.
            for stale in disks.compactMap(\.staleSourceImage) { try? FileManager.default.removeItem(atPath: stale) }
        }
    }

    /// QEMU alone: a destination QEMU started by hand in b's namespace, migrated to over TCP.
    /// Returns the destination's serial log and its QEMU's pid (the caller stops it).
    private func migrateWithQEMU(_ mode: BenchMode, _ source: VMRecord, _ watcher: HeartbeatWatcher,
                                 _ run: inout BenchRun) throws -> (String, Int32) {
        let dir = lab.directory + "/bench-dst"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let paths = VMPaths(directory: dir)
        watcher.add(path: paths.serialLog)
        // With a disk: the destination QEMU gets an empty image of its own to be copied into.
        var spec = source.spec
        let disk = !spec.disks.isEmpty
        if disk {
            let copy = dir + "/disk0." + spec.disks[0].format.rawValue
            try DiskImage.create(path: copy, format: spec.disks[0].format, virtualSizeBytes: spec.disks[0].virtualSizeBytes)
            spec.disks[0].path = copy
        }
        // Its NIC as a management layer gives it one: a tap made beforehand on b's bridge
        // (persistent here, opened by name), on the network from the start; QEMU announces
        // the guest when it has loaded it.
        let nics = spec.nics
        spec.nics = []
        var argv = QEMU.arguments(spec: spec, paths: paths, store: a.store.bootFiles, incoming: true)
        for nic in nics {
            let ns = lab.namespace("b")
            try Command.check(["ip", "-n", ns, "tuntap", "add", "dev", nic.tapName, "mode", "tap", "vnet_hdr"])
            try Command.check(["ip", "-n", ns, "link", "set", nic.tapName, "master", nic.bridge, "up"])
        }
        argv += GuestNICs.qemuArguments(nics, taps: nics.map { "ifname=\($0.tapName),script=no,downscript=no" })
        let mptcp = mode == .qemuMPTCP
        if mptcp { argv = ["mptcpize", "run"] + argv }
        let launched = try Command.run(["ip", "netns", "exec", lab.namespace("b")] + argv)
        guard launched.succeeded, let pidText = try? String(contentsOfFile: paths.pidFile, encoding: .utf8),
              let destPID = Int32(pidText.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw BenchError("cannot start the destination QEMU: \(launched.stderr)")
        }
        var handedOver = false
        defer {
            if !handedOver {
                ProcessStats.terminate(pid: destPID)
                // Its persistent taps go with it (the caller removes them only after a success).
                for nic in nics { _ = try? Command.run(["ip", "-n", lab.namespace("b"), "link", "del", nic.tapName]) }
            }
        }
        let dst = try QMPClient(path: paths.qmpSocket)
        let src = try QMPClient(path: source.paths.qmpSocket)
        // The guest's pause by QEMU's own events; `cont` at b the moment it has loaded, as
        // a management layer watching its events would (QEMU alone has no pause of Ferry's).
        let moments = Locked<(stop: Double?, resume: Double?)>((nil, nil))
        let loaded = Monitor()
        let loadedSignal = loaded.makeCondition()
        let dstDone = Locked(false)
        let preSwitchover = Locked(false)
        src.eventHandler = { event in
            if event.name == "STOP" { moments.withLock { $0.stop = $0.stop ?? event.timestamp } }
            if event.name == "MIGRATION", event.data["status"]?.string == "pre-switchover" {
                preSwitchover.withLock { $0 = true }
                loaded.withLock { loadedSignal.broadcast() }
            }
        }
        dst.eventHandler = { event in
            if event.name == "RESUME" { moments.withLock { $0.resume = $0.resume ?? event.timestamp } }
            if event.name == "MIGRATION", event.data["status"]?.string == "completed" {
                dstDone.withLock { $0 = true }
                loaded.withLock { loadedSignal.broadcast() }
            }
        }
        let multifd = mode == .qemuMultifd || mode == .qemuECMP
        for q in [src, dst] {
            try q.setMigrationCapabilities([("multifd", multifd), ("events", true)])
            if multifd { try q.setMigrationParameters(["multifd-channels": 2]) }
        }
        if mode == .qemuAutoConverge { try src.setMigrationCapabilities([("auto-converge", true)]) }
        try src.setMigrationParameters(["max-bandwidth": .number(100_000_000_000), "downtime-limit": 300])
        if disk {
            // As libvirt copies a disk: the destination serves its image over NBD (TCP, on b's
            // first NIC), the source mirrors into it (active), and the memory follows once the
            // mirror has caught up; QEMU waits at pre-switchover for the mirror's completion.
            run.diskCopySeconds = try copyDiskWithQEMU(src: src, dst: dst, bytes: &run.diskBytes)
            try src.setMigrationCapabilities([("pause-before-switchover", true)])
        }
        let host = mode == .qemuECMP ? Self.ecmpAddress : lab.address("b", nic: 0)
        let uri = "tcp:\(host):\(Self.qemuPort)"
        // Under MPTCP the destination listens on every address, so that the subflows the
        // source opens to b's other (announced) addresses find the listener.
        let listenURI = mptcp ? "tcp:0.0.0.0:\(Self.qemuPort)" : uri
        try dst.execute("migrate-incoming", arguments: ["uri": .string(listenURI)])
        let cpuBefore = ProcessStats.cpuSeconds(pid: source.state.pid) ?? 0
        let started = ContinuousClock.now
        try src.execute("migrate", arguments: ["uri": .string(uri)])
        var mirrorDone = false
        let cap = Int64(scenario.capSeconds ?? 900)
        while !dstDone.withLock({ $0 }) {
            // The event wakes this at once; the query, every 200 ms, catches a failure.
            _ = loaded.withLock { loadedSignal.wait(timeout: .milliseconds(200)) }
            if dstDone.withLock({ $0 }) { break }
            if disk && !mirrorDone && preSwitchover.withLock({ $0 }) {
                try src.execute("block-job-cancel", arguments: ["device": "bench-copy"])
                let until = ContinuousClock.now + .seconds(30)
                while (try src.execute("query-block-jobs").array?.isEmpty == false) && ContinuousClock.now < until {
                    Thread.sleep(forTimeInterval: 0.002)
                }
                try src.execute("blockdev-del", arguments: ["node-name": "disk0-copy"])
                try src.execute("migrate-continue", arguments: ["state": "pre-switchover"])
                mirrorDone = true
            }
            let s = try src.queryMigrate()
            if s.status == .failed || s.status == .cancelled {
                throw BenchError("QEMU: migration \(s.status): \(s.errorDescription ?? "")")
            }
            if try dst.queryMigrate().status == .failed { throw BenchError("destination QEMU failed to load") }
            if ContinuousClock.now - started > .seconds(cap) {
                src.cancelMigration(timeout: .seconds(15))
                throw BenchError("not completed within the cap of \(cap) s (QEMU alone, \(mode.rawValue)); the guest stays on a")
            }
        }
        if disk { try dst.execute("nbd-server-stop") }
        try dst.execute("cont")
        run.transferSeconds = (ContinuousClock.now - started).seconds + (run.diskCopySeconds ?? 0)
        var info = try src.queryMigrate()
        while info.status != .completed && ContinuousClock.now - started < .seconds(900) {
            Thread.sleep(forTimeInterval: 0.01)
            info = try src.queryMigrate()
        }
        run.sourceQEMUCPUSeconds = (ProcessStats.cpuSeconds(pid: source.state.pid) ?? cpuBefore) - cpuBefore
        run.destinationQEMUCPUSeconds = ProcessStats.cpuSeconds(pid: destPID)
        let seen = moments.withLock { $0 }
        if let stop = seen.stop, let resume = seen.resume { run.guestPauseMilliseconds = (resume - stop) * 1000 }
        run.totalSeconds = (ContinuousClock.now - started).seconds + (run.diskCopySeconds ?? 0)
        run.ramBytes = info.transferredBytes
        // With a disk, what moved is its data too (the mirror's count includes skipped zeros).
        let moved = Double(info.transferredBytes) + Double(disk ? scenario.diskMiB << 20 : 0)
        run.throughputBitsPerSecond = moved * 8 / max(run.transferSeconds, 0.001)
        run.qemuDowntimeMilliseconds = info.downtimeMilliseconds
        try? src.quit()
        handedOver = true
        return (paths.serialLog, destPID)
    }
}

extension BenchRunner {
    static let nbdPort = 7481

    /// QEMU alone's disk copy as libvirt makes it by default: NBD server at b, a mirror in
    /// background mode (QEMU's default granularity) at a, until the mirror is ready (at most
    /// 300 s: a guest that dirties faster than the link never lets it be). Returns the
    /// seconds it took; `bytes`: the mirror's length.
    func copyDiskWithQEMU(src: QMPClient, dst: QMPClient, bytes: inout UInt64?) throws -> Double {
        let host = lab.address("b", nic: 0)
        try dst.execute("nbd-server-start", arguments: ["addr": ["type": "inet", "data": ["host": .string(host), "port": .string(String(Self.nbdPort))]]])
        try dst.execute("block-export-add", arguments: ["type": "nbd", "id": "disk0", "node-name": "disk0", "writable": true])
        let started = ContinuousClock.now
        try src.execute("blockdev-add", arguments: ["driver": "nbd", "node-name": "disk0-copy", "export": "disk0",
                                                    "server": ["type": "inet", "host": .string(host), "port": .string(String(Self.nbdPort))]])
        try src.execute("blockdev-mirror", arguments: ["job-id": "bench-copy", "device": "disk0", "target": "disk0-copy",
                                                       "sync": "full", "copy-mode": "background"])
        while ContinuousClock.now - started < .seconds(300) {
            if let job = try src.execute("query-block-jobs").array?.first, job["ready"]?.bool == true {
                bytes = UInt64(job["len"]?.double ?? 0)
                return (ContinuousClock.now - started).seconds
            }
            Thread.sleep(forTimeInterval: 0.01)
        }
        throw BenchError("QEMU's disk copy did not catch up in 300 s (the guest dirties its disk faster than the mirror copies it)")
    }
}

/// Samples a namespace's NIC transmit counters every 50 ms, through /proc/PID/net/dev of a
/// process inside it (no process spawned per sample). Its own thread samples; the bench's
/// thread stops it and reads the result.
// `samples` and `stopped` are under `lock`.
final class NICSampler: @unchecked Sendable {
    private let lock = Monitor()
    private var samples: [(Double, UInt64)] = []
    private var stopped = false

    init(pid: Int32, nics: [String]) {
        let origin = ContinuousClock.now
        Thread { [self] in
            while !lock.withLock({ stopped }) {
                if let total = Self.txBytes(pid: pid, nics: nics) {
                    let t = (ContinuousClock.now - origin).seconds
                    lock.withLock { samples.append((t, total)) }
                }
                Thread.sleep(forTimeInterval: 0.05)
            }
        }.start()
    }

    func stop() { lock.withLock { stopped = true } }

    static func txBytes(pid: Int32, nics: [String]) -> UInt64? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/net/dev", encoding: .utf8) else { return nil }
        var total: UInt64 = 0
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1)
            guard parts.count == 2, nics.contains(parts[0].trimmingCharacters(in: .whitespaces)) else { continue }
            let fields = parts[1].split(separator: " ")
            if fields.count > 8, let tx = UInt64(fields[8]) { total += tx }
        }
        return total
    }

    /// Bits per second between 1% and 99% of the bytes sent while sampling.
    var streamingBitsPerSecond: Double? {
        let s = lock.withLock { samples }
        guard let first = s.first, let last = s.last, last.1 > first.1 else { return nil }
        let total = Double(last.1 - first.1)
        guard let lo = s.first(where: { Double($0.1 - first.1) >= 0.01 * total }),
              let hi = s.first(where: { Double($0.1 - first.1) >= 0.99 * total }), hi.0 > lo.0 else { return nil }
        return Double(hi.1 - lo.1) * 8 / (hi.0 - lo.0)
    }
}

/// The machine-wide lock a `ferry bench` holds while it uses its lab (`flock` on
/// /run/ferry-lab/bench.lock, which names the holder's pid; the kernel drops it when the
/// process ends, however it ends).
public struct BenchLock {
    public static let path = "/run/ferry-lab/bench.lock"
    private let fd: Int32

    /// Takes the lock, or fails at once with the pid of the bench holding it.
    public static func acquire() throws -> BenchLock {
        try FileManager.default.createDirectory(atPath: "/run/ferry-lab", withIntermediateDirectories: true)
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw BenchError("cannot open \(path): \(errnoDescription(errno))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
            close(fd)
            throw BenchError("another ferry bench is running on this machine (pid \(holder.isEmpty ? "unknown" : holder)), "
                + "and runs in the same lab; wait for it to finish or stop it")
        }
        ftruncate(fd, 0)
        let pid = "\(getpid())\n"
        _ = pid.withCString { write(fd, $0, strlen($0)) }
        return BenchLock(fd: fd)
    }

    public func release() {
        ftruncate(fd, 0)
        flock(fd, LOCK_UN)
        close(fd)
    }
}

