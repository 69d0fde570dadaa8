import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import FerryWire
import Foundation
import Testing

/// The chaos matrix: a fault in each phase of a migration, with real QEMU in the lab and
/// a daemon on both hosts (as on real hosts, where the daemons settle what a crash left).
/// For every cell: at most one copy of the VM ever runs; exactly one runs afterwards
/// unless the fault killed the only one; the survivor's guest memory check is intact; a
/// failure says why; the next migration succeeds. `FERRY_CHAOS=all` runs all 46 cells
/// (about 30 minutes); by default the 7 cells below (a NIC down, the control connection's
/// NIC down and every NIC down are `MultichannelTests`', in more detail). `FERRY_CHAOS_OUT=FILE` appends one
/// line per cell, the table of docs/RELIABILITY.md. `FERRY_CHAOS_DISK=1` gives the VM a disk
/// that is copied while the guest writes to it: its blocks must read back right where the VM
/// survives, and no partial copy may stay on the other host.
@Suite("Chaos: faults x phases", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest (scripts/test.sh)"))
struct ChaosTests {
    enum Fault: String, CaseIterable, Sendable, CustomTestStringConvertible {
        static func named(_ name: String) -> Fault? { allCases.first { "\($0)" == name } }
        case nicDown = "NIC down"
        /// eth0 of the source: the path of the control connection (`--to`).
        case controlNICDown = "control NIC down"
        case channelReset = "one channel reset"
        case allNICsDown = "all NICs down, then back"
        case killServe = "kill -9 destination ferry serve"
        case killMigrate = "kill -9 ferry migrate"
        case killDestinationQEMU = "kill -9 destination QEMU"
        case killSourceQEMU = "kill -9 source QEMU"
        var testDescription: String { rawValue }
    }

    enum Phase: String, CaseIterable, Sendable, CustomTestStringConvertible {
        static func named(_ name: String) -> Phase? { allCases.first { "\($0)" == name } }
        case setup, early = "early transfer", late = "late transfer", switchover, afterSwitchover = "right after switchover"
        /// Committed into postcopy (`--converge postcopy`, a guest that writes faster than
        /// the link): the VM runs on b and faults in pages that only a's QEMU has. The
        /// crashes and NICs here are survived by resuming; a QEMU killed loses the VM (both
        /// halves are needed), so those two cells are left out of `all`.
        case postcopy = "in postcopy"
        var testDescription: String { rawValue }

        static var matrix: [Phase] { [.setup, .early, .late, .switchover, .afterSwitchover] }

        /// The fault point that holds the migration still in this phase (4 s).
        var pause: FaultPoint? {
            switch self {
            case .setup: .sourceSetup
            case .switchover: .sourceAfterCommitRecord
            case .afterSwitchover: .sourceAfterCommitted
            case .early, .late, .postcopy: nil
            }
        }
    }

    struct Cell: Sendable, CustomTestStringConvertible {
        var fault: Fault
        var phase: Phase
        var testDescription: String { "\(fault.rawValue) / \(phase.rawValue)" }
    }

    static let cells: [Cell] = {
        let choice = ProcessInfo.processInfo.environment["FERRY_CHAOS"] ?? ""
        if choice == "all" {
            return Fault.allCases.flatMap { f in Phase.matrix.map { Cell(fault: f, phase: $0) } }
                + [Fault.nicDown, .controlNICDown, .channelReset, .allNICsDown, .killServe, .killMigrate].map { Cell(fault: $0, phase: .postcopy) }
        }
        // Or some cells by name: FERRY_CHAOS=killServe/switchover,nicDown/late
        let named = choice.split(separator: ",").compactMap { item -> Cell? in
            let parts = item.split(separator: "/").map(String.init)
            guard parts.count == 2, let f = Fault.named(parts[0]), let p = Phase.named(parts[1]) else { return nil }
            return Cell(fault: f, phase: p)
        }
        if !named.isEmpty { return named }
        // The destination's QEMU and daemon killed before the switchover are
        // EndToEndTests.failure's (destinationQEMUKilled, destinationDaemonKilled); the
        // destination's daemon killed in postcopy is PostcopyTests.serveKilledInPostcopy.
        return [Cell(fault: .killMigrate, phase: .switchover), Cell(fault: .killServe, phase: .switchover),
                Cell(fault: .killSourceQEMU, phase: .switchover), Cell(fault: .killMigrate, phase: .afterSwitchover),
                Cell(fault: .killMigrate, phase: .postcopy)]
    }()

    @Test("a fault in a phase: one copy runs, intact; the error is clear; the next migration succeeds", arguments: cells)
    func cell(_ cell: Cell) throws {
        let lab = try TestLab(nics: 2, rate: "150mbit")
        // The fault points read the environment of the processes started from here.
        let marks = lab.lab.directory + "/fault-marks"
        if let point = cell.phase.pause {
            setenv("FERRY_FAULT_PAUSE", "\(point.rawValue):4", 1)
            setenv("FERRY_FAULT_MARK", marks, 1)
        }
        defer {
            unsetenv("FERRY_FAULT_PAUSE")
            unsetenv("FERRY_FAULT_MARK")
        }
        try lab.serve(on: "a")
        var destinationDaemon = try lab.serve(on: "b")
        // FERRY_CHAOS_DISK=1: the VM has a disk that is copied, which the guest writes to.
        let disk = ProcessInfo.processInfo.environment["FERRY_CHAOS_DISK"] == "1" && cell.phase != .postcopy
        let image = disk ? try DiskTests.makeImage(lab, "vm1-disk.qcow2", format: .qcow2, pattern: true) : nil
        // In postcopy: a guest that rewrites its memory faster than the link, switched once
        // QEMU's first pass is done (a disk copy cannot go with postcopy).
        let postcopy = cell.phase == .postcopy
        _ = try lab.startDemoVM("vm1", memory: 256, fill: postcopy ? 128 : 64, dirty: postcopy ? PostcopyTests.dirty : 2,
                                disks: image.map { [$0] } ?? [], append: disk ? DiskTests.diskWorkload : "")
        let run = RunningMigration(lab, "vm1", extra: postcopy ? ["--converge", "postcopy", "--postcopy", "allowed"] : [])

        // Reach the phase.
        let reached: Bool
        switch cell.phase {
        case .early: reached = run.wait(forStreamBytes: 16 << 20)
        case .late: reached = run.wait(forStreamBytes: 100 << 20)
        case .postcopy: reached = run.wait(forPhase: .postcopy, timeout: .seconds(120))
        case .setup, .switchover, .afterSwitchover:
            let mark = cell.phase.pause!.rawValue
            reached = Self.waitUntil(timeout: .seconds(60)) {
                (try? String(contentsOfFile: marks, encoding: .utf8))?.contains(mark) == true
            }
        }
        try #require(reached, "the migration never reached \(cell.phase.rawValue)")

        // The fault.
        var restoreNICs: [(String, Int)] = []
        switch cell.fault {
        case .nicDown:
            try lab.lab.setNIC("a", nic: 1, up: false)
            restoreNICs = [("a", 1)]
        case .controlNICDown:
            try lab.lab.setNIC("a", nic: 0, up: false)
            restoreNICs = [("a", 0)]
        case .channelReset:
            let ports = try lab.shell("a", "ss -tnH state established dst \(lab.lab.address("b", nic: 1)) | awk '{print $3}' | sed 's/.*://' | head -1")
            let port = ports.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            if !port.isEmpty { try lab.shell("a", "ss -K state established sport = :\(port)") }
        case .allNICsDown:
            try lab.lab.setNIC("a", nic: 0, up: false)
            try lab.lab.setNIC("a", nic: 1, up: false)
            Thread.sleep(forTimeInterval: 2)
            try lab.lab.setNIC("a", nic: 0, up: true)
            try lab.lab.setNIC("a", nic: 1, up: true)
        case .killServe:
            kill(destinationDaemon, SIGKILL)
            _ = ProcessStats.waitForExit(pid: destinationDaemon, timeout: .seconds(5))
            unsetenv("FERRY_FAULT_PAUSE")
            do {
                destinationDaemon = try lab.serve(on: "b")  // as systemd would
            } catch {
                let holders = try? lab.shell("b", "ss -tlnpa | grep 7470")
                Issue.record("restarting serve on b: \(error); \(holders?.stdout ?? "")")
                throw error
            }
        case .killMigrate:
            let pids = Self.pids(of: [Env.ferry, "migrate", "vm1"])
            try #require(!pids.isEmpty, "no ferry migrate process to kill")
            for pid in pids { kill(pid, SIGKILL) }
        case .killDestinationQEMU:
            let record = try? lab.b.store.record("vm1")
            if let pid = record?.state.pid, record?.alive == true { kill(pid, SIGKILL) }
        case .killSourceQEMU:
            let record = try? lab.a.store.record("vm1")
            if let pid = record?.state.pid, record?.alive == true { kill(pid, SIGKILL) }
        }
        let (result, report) = try run.finish(timeout: .seconds(120))
        for (host, nic) in restoreNICs { try lab.lab.setNIC(host, nic: nic, up: true) }

        // Settled: no migration half-done on either host (the daemons reconcile every 2 s).
        let settled = Self.waitUntil(timeout: .seconds(45)) {
            [lab.a, lab.b].allSatisfy { host in
                guard let r = try? host.store.record("vm1") else { return true }
                return r.state.phase == .running && host.store.handover("vm1") == nil
            }
        }
        let copies = ["a", "b"].filter { h in
            (try? lab.host(h).store.record("vm1"))?.alive == true
        }
        let processes = Self.pids(of: ["guest=vm1,debug-threads=on", lab.lab.directory + "/"])
        let onlyCopyKilled = (cell.fault == .killSourceQEMU && [.setup, .early, .late].contains(cell.phase))
            || (cell.fault == .killDestinationQEMU && cell.phase == .afterSwitchover)
        let outcome = copies.isEmpty ? "no copy (its QEMU was killed)" : "runs on \(copies.joined(separator: " and "))"
        let error = report?.error ?? (result.succeeded ? "" : result.stdout.split(separator: "\n").first { $0.contains("error") }.map(String.init) ?? "")
        Self.record(cell, outcome: outcome, migrate: report.map { $0.outcome.rawValue } ?? (cell.fault == .killMigrate ? "killed" : "no report"), error: error)

        #expect(settled, "not settled within 45 s: a \((try? lab.a.store.record("vm1"))?.state.phase.rawValue ?? "-"), b \((try? lab.b.store.record("vm1"))?.state.phase.rawValue ?? "-")")
        #expect(processes.count <= 1, "\(processes.count) QEMUs run vm1")
        #expect(copies.count == (onlyCopyKilled ? 0 : 1), "copies: \(copies)")
        if let report, !report.succeeded { #expect(!(report.error ?? "").isEmpty, "a failed migration without an error") }
        guard let host = copies.first else { return }
        try lab.expectRunningAndHealthy("vm1", on: host)
        if disk {
            // Its disk intact where it runs, and no partial copy left on the other host.
            try DiskTests.expectDiskHealthy(lab, "vm1", on: host)
            let other = host == "a" ? lab.b : lab.a
            let left = (try? FileManager.default.contentsOfDirectory(atPath: other.store.paths.disksDirectory + "/vm1")) ?? []
            #expect(left.isEmpty, "a copy left on the other host: \(left)")
            if host == "b" { try? FileManager.default.removeItem(atPath: image!) }  // as the operator would: it is stale
        }
        // The next migration succeeds.
        let other = host == "a" ? "b" : "a"
        let (next, nextReport) = try lab.migrate("vm1", from: host, to: other,
                                                 extra: postcopy ? ["--converge", "postcopy", "--postcopy", "allowed"] : [])
        #expect(next.succeeded && nextReport?.succeeded == true, "next migration \(host) -> \(other): \(next.stdout)")
        try lab.expectRunningAndHealthy("vm1", on: other)
        _ = destinationDaemon
    }

    /// Processes whose command line contains every string of `parts`, in order.
    static func pids(of parts: [String]) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap(Int32.init).filter { pid in
            guard let argv = ProcessStats.commandLine(pid: pid) else { return false }
            var i = 0
            for arg in argv where i < parts.count && arg.contains(parts[i]) { i += 1 }
            return i == parts.count && pid != getpid()
        }
    }

    static func waitUntil(timeout: Duration, _ condition: () -> Bool) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if condition() { return true }
            Thread.sleep(forTimeInterval: 0.25)
        }
        return condition()
    }

    static func record(_ cell: Cell, outcome: String, migrate: String, error: String) {
        guard let path = ProcessInfo.processInfo.environment["FERRY_CHAOS_OUT"] else { return }
        appendLine("| \(cell.fault.rawValue) | \(cell.phase.rawValue) | \(outcome) | \(migrate) | \(error.replacingOccurrences(of: "|", with: "/").prefix(160)) |",
                   to: path)
    }
}
