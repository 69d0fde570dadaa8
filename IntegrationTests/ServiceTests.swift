import FerryIO
import FerryLab
import FerryVM
import Foundation
import Testing

/// `ferry serve` as packaging/ferry.service runs it, without systemd (none runs here): a
/// restart as KillMode=process does it (SIGTERM to the daemon's main pid, nothing else)
/// leaves the QEMUs the daemon started running, and the next daemon takes them on; its
/// log lines carry journald priorities when stderr is the journal.
@Suite("Running as a service", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest (scripts/test.sh)"))
struct ServiceTests {
    @Test("a daemon restart (KillMode=process) keeps the VMs it started; the next daemon adopts them")
    func restartKeepsVMs() throws {
        let lab = try TestLab()
        // stderr as the journal: JOURNAL_STREAM names the daemon's stderr (its log file).
        let journal = "export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2)"
        let first = try lab.serve(on: "b", prelude: journal)
        _ = try lab.startDemoVM("vm1", memory: 128, fill: 32, dirty: 2)
        let (result, _) = try lab.migrate("vm1")
        try #require(result.succeeded, "migration failed: \(result.stderr)")
        let before = try lab.b.store.record("vm1")
        // The QEMU on b is the daemon's: it started it for the incoming migration.
        try #require(before.alive && before.state.pid > 0)

        // systemctl restart ferry, KillMode=process: SIGTERM to the main pid alone.
        let signals = (try? String(contentsOfFile: "/proc/\(first)/status", encoding: .utf8))?.split(separator: "\n").filter { $0.hasPrefix("Sig") } ?? []
        kill(first, SIGTERM)
        #expect(ProcessStats.waitForExit(pid: first, timeout: .seconds(5)), "the daemon ignored SIGTERM: \(ProcessStats.commandLine(pid: first) ?? []) \(signals)")
        Thread.sleep(forTimeInterval: 0.5)
        #expect(ProcessStats.isAlive(pid: before.state.pid), "the VM's QEMU died with the daemon")

        let second = try lab.serve(on: "b", prelude: journal)
        let status = try lab.b.ferry(["status"])
        #expect(status.stdout.contains("ferry serve: running (pid \(second))"), "\(status.stdout)")
        #expect(status.stdout.contains("vm1 running"), "\(status.stdout)")
        let after = try lab.b.store.record("vm1")
        #expect(after.state.pid == before.state.pid, "the VM is the same QEMU")
        try lab.expectRunningAndHealthy("vm1", on: "b")

        // journald's format: every log line starts with its priority, no timestamps, and no
        // progress output from the daemon.
        let log = try String(contentsOfFile: lab.b.serveLog, encoding: .utf8)
        let logLines = log.split(separator: "\n").filter { !$0.hasPrefix("ferry serve:") }
        #expect(log.contains("<6>ferry.serve: ferry serve listening"), "\(log.suffix(1500))")
        #expect(logLines.allSatisfy { $0.first == "<" && $0.dropFirst(2).hasPrefix(">") }, "\(logLines.prefix(5))")
        #expect(!log.contains("\r"), "progress output in the daemon's log")
    }
}
