import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import FerryWire
import Foundation
import Testing

/// Same-host updates with real QEMUs under TCG and the real binary: the VM moves to a new
/// QEMU with its RAM left in place in the shared memory file.
@Suite("Same-host update", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest (scripts/test.sh)"))
struct UpdateTests {
    /// The QEMU processes that map `memoryFile` (by their command line): how many copies
    /// of the VM exist, whatever their state.
    static func qemuCopies(of memoryFile: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap(Int32.init).filter { pid in
            ProcessStats.commandLine(pid: pid)?.contains { $0.contains("mem-path=\(memoryFile),") } ?? false
        }
    }

    /// Runs `ferry ARGS --report-file F --quiet` on `host`; the result and the parsed report.
    static func run(_ lab: TestLab, on host: String = "a", _ args: [String]) throws -> (CommandResult, MigrationReport?) {
        let path = lab.lab.directory + "/report-\(UUID().uuidString.prefix(8)).json"
        let result = try lab.host(host).ferry(args + ["--report-file", path, "--quiet"])
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return (result, FileManager.default.contents(atPath: path).flatMap { try? decoder.decode(MigrationReport.self, from: $0) })
    }

    /// A script that runs the real QEMU with its arguments changed by `sed`-free shell:
    /// records that it ran, then execs QEMU with `transform` applied to "$@".
    static func wrapper(_ lab: TestLab, name: String, body: String) throws -> String {
        let path = lab.lab.directory + "/\(name)"
        let qemu = try #require(ProcessInfo.processInfo.environment["PATH"]?.split(separator: ":")
            .map { "\($0)/qemu-system-x86_64" }.first { FileManager.default.isExecutableFile(atPath: $0) })
        try "#!/bin/bash\necho \"$$ $*\" >> \(path).ran\nQEMU=\(qemu)\n\(body)\n".write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o755)
        return path
    }

    @Test("an update keeps the heartbeat and memory, moves no RAM, and a network migration afterwards still sends it")
    func updateThenMigrate() throws {
        let lab = try TestLab(nics: 1)
        try lab.serve(on: "b")
        let vm = try lab.startDemoVM("vm1", memory: 512, fill: 256, dirty: 8)
        let memory = vm.paths.memoryFile
        #expect(VMStore.fileSystemType(of: memory) == "tmpfs")
        #expect(VMStore.mapsMemory(pid: vm.state.pid, file: memory), "the VM's RAM is not the shared file")
        #expect(memory != lab.b.store.vmPaths("vm1").memoryFile, "two hosts must not share a RAM file")
        let watcher = HeartbeatWatcher(paths: [vm.paths.serialLog])

        // Twice: `vm update`, then `migrate --to localhost` (the second starts from a QEMU
        // that was itself a successor, reached through the qmp.sock link).
        var pid = vm.state.pid
        for args in [["vm", "update", "vm1"], ["migrate", "vm1", "--to", "localhost"]] {
            let (result, report) = try Self.run(lab, args)
            #expect(result.succeeded, "\(args) failed: \(result.stdout)\(result.stderr)")
            let r = try #require(report)
            #expect(r.outcome == .succeeded)
            #expect(r.mode == SameHostUpdate.modeDescription)
            #expect(r.streamBytes < 8 << 20, "RAM moved: \(r.streamBytes) bytes of stream for 256 MiB of guest data")
            #expect(r.totalSeconds < 5, "update took \(r.totalSeconds) s")
            #expect((r.qemuDowntimeMilliseconds ?? 9999) < 1000, "QEMU downtime \(r.qemuDowntimeMilliseconds ?? -1) ms")
            let record = try lab.a.store.record("vm1")
            #expect(record.alive && record.state.phase == .running && record.state.pid != pid)
            #expect(!ProcessStats.isAlive(pid: pid), "the old QEMU still runs")
            #expect(VMStore.mapsMemory(pid: record.state.pid, file: memory))
            #expect(Self.qemuCopies(of: memory) == [record.state.pid])
            pid = record.state.pid
            try lab.expectRunningAndHealthy("vm1", on: "a")
        }
        watcher.stop()
        #expect(watcher.skippedSequences == 0 && !watcher.sequenceWentBack && !watcher.sawErrors,
                "the guest's counter went on across both updates, memory checks OK")
        #expect(watcher.largestGapSeconds < 3, "the guest stalled \(watcher.largestGapSeconds) s")
        // QMP through the link: list and console commands still reach the VM.
        #expect(try lab.a.ferry(["vm", "list"]).stdout.contains("\(pid)"))

        // Across hosts RAM must be sent: x-ignore-shared is off again.
        let (result, report) = try lab.migrate("vm1")
        #expect(result.succeeded, "migrate failed: \(result.stdout)\(result.stderr)")
        #expect((report?.streamBytes ?? 0) > 256 << 20, "the guest's memory crossed the wire")
        try lab.expectRunningAndHealthy("vm1", on: "b")
        #expect(!FileManager.default.fileExists(atPath: memory), "the source's RAM file outlived the migration")
        let arrived = try lab.b.store.record("vm1")
        #expect(VMStore.mapsMemory(pid: arrived.state.pid, file: arrived.paths.memoryFile))

        // Stopped for good: the RAM file goes with it.
        try lab.b.ferry(["vm", "stop", "vm1"])
        #expect(!FileManager.default.fileExists(atPath: arrived.paths.memoryFile))
    }

    @Test("vm update --qemu runs the VM under the binary it names")
    func explicitBinary() throws {
        let lab = try TestLab(nics: 1)
        let vm = try lab.startDemoVM("vm1", memory: 256, fill: 64, dirty: 4)
        let qemu = try Self.wrapper(lab, name: "qemu-new", body: "exec \"$QEMU\" \"$@\"")
        let (result, report) = try Self.run(lab, ["vm", "update", "vm1", "--qemu", qemu])
        #expect(result.succeeded, "update failed: \(result.stdout)\(result.stderr)")
        #expect(report?.outcome == .succeeded)
        let ran = (try? String(contentsOfFile: qemu + ".ran", encoding: .utf8)) ?? ""
        #expect(ran.contains("-incoming defer") && ran.contains("mem-path=\(vm.paths.memoryFile),share=on"), "the wrapper did not start the new QEMU: \(ran)")
        let record = try lab.a.store.record("vm1")
        #expect(record.state.qemuBinary == qemu)
        #expect(record.state.pid != vm.state.pid && !ProcessStats.isAlive(pid: vm.state.pid))
        try lab.expectRunningAndHealthy("vm1", on: "a")
        try lab.a.ferry(["vm", "stop", "vm1"])
        #expect(!FileManager.default.fileExists(atPath: vm.paths.memoryFile))
        #expect(Self.qemuCopies(of: vm.paths.memoryFile).isEmpty)
    }

    @Test("a failed update leaves the VM running in its old QEMU, one copy, before and after the old one finished sending")
    func failedUpdates() throws {
        let lab = try TestLab(nics: 1)
        let vm = try lab.startDemoVM("vm1", memory: 256, fill: 64, dirty: 4)
        let memory = vm.paths.memoryFile
        // Not QEMU at all; a QEMU that exits at once; a QEMU whose VM has a CPU fewer, so that
        // loading fails only after the old QEMU has sent everything and sits in postmigrate.
        let exits = try Self.wrapper(lab, name: "qemu-exits", body: "echo 'qemu: simulated start-up failure' >&2; exit 1")
        let oneCPU = try Self.wrapper(lab, name: "qemu-1cpu", body: """
            args=(); for a in "$@"; do if [ "$prev" = "-smp" ]; then a=1; fi; args+=("$a"); prev="$a"; done
            exec "$QEMU" "${args[@]}"
            """)
        for (binary, failedPhase) in [("/bin/true", "starting-destination"), (exits, "starting-destination"), (oneCPU, "switchover")] {
            let watcher = HeartbeatWatcher(paths: [vm.paths.serialLog])
            let (result, report) = try Self.run(lab, ["vm", "update", "vm1", "--qemu", binary])
            #expect(result.status == 1, "\(binary): exit \(result.status): \(result.stdout)")
            let r = try #require(report)
            #expect(r.outcome == .failedVMOnSource)
            #expect(r.failedPhase == failedPhase, "\(binary): \(r.error ?? "")")
            if binary == exits { #expect(r.error?.contains("simulated start-up failure") == true, "\(r.error ?? "")") }
            let record = try lab.a.store.record("vm1")
            #expect(record.alive && record.state.pid == vm.state.pid && record.state.phase == .running)
            #expect(Self.qemuCopies(of: memory) == [vm.state.pid], "exactly one copy of the VM")
            try lab.expectRunningAndHealthy("vm1", on: "a")
            watcher.stop()
            #expect(watcher.skippedSequences == 0 && !watcher.sawErrors && watcher.heartbeatCount > 0)
        }
        #expect(FileManager.default.fileExists(atPath: memory))
        // And the VM can still be updated for real.
        let (result, _) = try Self.run(lab, ["vm", "update", "vm1"])
        #expect(result.succeeded, "update after failures: \(result.stdout)")
        try lab.expectRunningAndHealthy("vm1", on: "a")
        try lab.a.ferry(["vm", "stop", "vm1"])
    }

    @Test("an update whose command is killed settles to one running copy: undone before the switchover, completed after it",
          arguments: [FaultPoint.updateBeforeCont, .updateAfterCont])
    func killedUpdate(point: FaultPoint) throws {
        let lab = try TestLab(nics: 1)
        let vm = try lab.startDemoVM("vm1", memory: 256, fill: 64, dirty: 4)
        let memory = vm.paths.memoryFile
        let marks = lab.lab.directory + "/marks-\(point.rawValue)"
        setenv("FERRY_FAULT_PAUSE", "\(point.rawValue):60", 1)
        setenv("FERRY_FAULT_MARK", marks, 1)
        let ended = Locked(false)
        Thread {
            _ = try? lab.a.ferry(["vm", "update", "vm1", "--quiet"])
            ended.withLock { $0 = true }
        }.start()
        let reached = ChaosTests.waitUntil(timeout: .seconds(60)) {
            (try? String(contentsOfFile: marks, encoding: .utf8))?.contains(point.rawValue) == true
        }
        unsetenv("FERRY_FAULT_PAUSE")
        unsetenv("FERRY_FAULT_MARK")
        try #require(reached, "the update never reached \(point.rawValue)")
        let updaters = ChaosTests.pids(of: [Env.ferry, "vm", "update", "vm1"])
        try #require(!updaters.isEmpty, "no ferry vm update to kill")
        for pid in updaters { kill(pid, SIGKILL) }
        #expect(ChaosTests.waitUntil(timeout: .seconds(10)) { ended.current })
        #expect(try lab.a.store.record("vm1").state.phase == .updating)
        #expect(Self.qemuCopies(of: memory).count == 2, "both QEMUs exist in the window")

        // `ferry vm list` settles it (as `ferry serve` would).
        let list = try lab.a.ferry(["vm", "list"])
        #expect(list.stdout.contains("reconciled: vm1: an update was interrupted"), "\(list.stdout)")
        let record = try lab.a.store.record("vm1")
        #expect(record.alive && record.state.phase == .running && record.state.update == nil)
        if point == .updateBeforeCont {
            #expect(record.state.pid == vm.state.pid, "undone: the VM stays in its old QEMU")
        } else {
            #expect(record.state.pid != vm.state.pid, "completed: the VM is in the new QEMU")
        }
        #expect(Self.qemuCopies(of: memory) == [record.state.pid], "exactly one copy of the VM")
        try lab.expectRunningAndHealthy("vm1", on: "a")
        // And the next update goes through.
        let (result, _) = try Self.run(lab, ["vm", "update", "vm1"])
        #expect(result.succeeded, "update after the settled one: \(result.stdout)\(result.stderr)")
        try lab.expectRunningAndHealthy("vm1", on: "a")
        try lab.a.ferry(["vm", "stop", "vm1"])
    }

    @Test("the RAM file survives a ferry serve restart, and the VM can be updated afterwards")
    func serveRestart() throws {
        let lab = try TestLab(nics: 1)
        let servePID = try lab.serve(on: "a")
        let vm = try lab.startDemoVM("vm1", memory: 256, fill: 64, dirty: 4)
        let memory = vm.paths.memoryFile
        let size = try FileManager.default.attributesOfItem(atPath: memory)[.size] as? UInt64
        #expect(size == UInt64(QEMU.ramKiB(vm.spec)) * 1024)
        #expect(ProcessStats.terminate(pid: servePID))
        try lab.serve(on: "a")
        #expect(FileManager.default.fileExists(atPath: memory))
        let record = try lab.a.store.record("vm1")
        #expect(record.alive && record.state.pid == vm.state.pid)
        #expect(VMStore.mapsMemory(pid: vm.state.pid, file: memory))
        try lab.expectRunningAndHealthy("vm1", on: "a")
        let (result, report) = try Self.run(lab, ["vm", "update", "vm1"])
        #expect(result.succeeded && report?.outcome == .succeeded, "update after restart: \(result.stdout)")
        try lab.expectRunningAndHealthy("vm1", on: "a")
        try lab.a.ferry(["vm", "stop", "vm1"])
        #expect(!FileManager.default.fileExists(atPath: memory))
    }
}
