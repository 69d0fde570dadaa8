import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import FerryWire
import Foundation
import Testing

/// `--postcopy allowed`: the VM runs at the destination before all its memory is there,
/// its missing pages asked for over QEMU's return path and sent ahead of the rest on the
/// preempt channel, both carried by Ferry's channels.
@Suite("Postcopy", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest"))
struct PostcopyTests {
    /// The guest of ``ThrottleTests``: it rewrites its memory as fast as its vCPUs can, far
    /// faster than one NIC at 300 Mbit/s carries it.
    static let rate = "300mbit", dirty = 4000

    @Test("--converge postcopy: a guest writing faster than the link runs at the destination after QEMU's first pass, faults in its missing pages, and its memory is intact")
    func postcopyCompletes() throws {
        let lab = try TestLab(nics: 1, rate: Self.rate)
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("hot", memory: 192, fill: 48, dirty: Self.dirty)
        let (result, report) = try lab.migrate("hot", extra: ["--converge", "postcopy", "--postcopy", "allowed", "--timeout", "120s"])
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        let r = try #require(report)
        let account = try #require(r.postcopy, "the report has no postcopy account: \(r.text)")
        print("postcopy: \(account.summary)\n\(r.text)")
        #expect(account.runningAt != nil && account.completedAt != nil)
        #expect(account.remainingBytes > 0, "nothing was left for postcopy to send")
        // The guest rewrites its memory all the time: it faults on pages not yet here.
        #expect((account.requests ?? 0) > 0, "no page request crossed: \(account.summary)")
        #expect(r.text.contains("postcopy"))
        try lab.expectRunningAndHealthy("hot", on: "b")
        lab.expectAbsent("hot", on: "a")
    }

    @Test("--converge auto with postcopy allowed: the throttle goes first, and when it cannot finish in time (here: as long again as the first pass), postcopy does")
    func autoTurnsToPostcopy() throws {
        let lab = try TestLab(nics: 1, rate: Self.rate)
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("hot", memory: 192, fill: 48, dirty: Self.dirty)
        let (result, report) = try lab.migrate("hot", extra: ["--converge", "auto", "--postcopy", "allowed", "--max-throttle", "30",
                                                              "--timeout", "120s"])
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        let r = try #require(report)
        let throttle = try #require(r.convergence, "no convergence account: \(r.text)")
        let account = try #require(r.postcopy, "auto never turned to postcopy: \(r.text)")
        print("auto: \(throttle.summary)\npostcopy: \(account.summary)")
        #expect(throttle.peakThrottlePercent > 0, "postcopy came before any throttle: \(throttle.summary)")
        #expect(throttle.peakThrottlePercent <= 30, "the throttle went past its ceiling: \(throttle.summary)")
        try lab.expectRunningAndHealthy("hot", on: "b")
        lab.expectAbsent("hot", on: "a")
    }

    @Test("ferry migrate --postcopy-now: the operator switches a migration that would never finish; one without --postcopy allowed says it cannot")
    func operatorSwitches() throws {
        let lab = try TestLab(nics: 1, rate: Self.rate)
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("hot", memory: 192, fill: 48, dirty: Self.dirty)
        _ = try lab.startDemoVM("cold", memory: 128, fill: 16, dirty: 1)
        // Without --postcopy allowed, the request is refused and the migration goes on.
        let plain = RunningMigration(lab, "hot", extra: ["--converge", "none", "--timeout", "60s"])
        try #require(plain.wait(forPhase: .transferring))
        let refused = try lab.a.ferry(["migrate", "--postcopy-now", "hot"])
        #expect(refused.status == 1 && refused.stderr.contains("--postcopy allowed"), "\(refused.stdout)\(refused.stderr)")
        #expect(try lab.a.ferry(["migrate", "--cancel", "hot"]).succeeded)
        let (cancelled, _) = try plain.finish()
        #expect(cancelled.status == 4, "\(cancelled.stdout)\(cancelled.stderr)")
        // With it, and no convergence of its own, the operator's switch finishes it.
        let running = RunningMigration(lab, "hot", extra: ["--converge", "none", "--postcopy", "allowed", "--timeout", "120s"])
        try #require(running.wait(forStreamBytes: 60 << 20))
        let asked = try lab.a.ferry(["migrate", "--postcopy-now", "hot"])
        #expect(asked.succeeded, "\(asked.stdout)\(asked.stderr)")
        let (result, report) = try running.finish()
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        let account = try #require(report?.postcopy, "no postcopy in the report")
        #expect(account.reason == "asked by the operator")
        #expect(account.completedAt != nil)
        #expect(running.progress.contains { $0.phase == MigrationPhase.postcopy.rawValue }, "progress never showed the postcopy phase")
        try lab.expectRunningAndHealthy("hot", on: "b")
        lab.expectAbsent("hot", on: "a")
        // Nothing running for it: a clear error.
        let none = try lab.a.ferry(["migrate", "--postcopy-now", "cold"])
        #expect(none.status == 1 && none.stderr.contains("no migration"), "\(none.stderr)")
    }

    @Test("in postcopy a NIC pulled fails over, and with every NIC down past --link-timeout the migration waits and resumes when they come back: the VM is never lost")
    func nicsLostInPostcopy() throws {
        let lab = try TestLab(nics: 2, rate: "100mbit")
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("hot", memory: 256, fill: 128, dirty: Self.dirty)
        let running = RunningMigration(lab, "hot", extra: ["--converge", "postcopy", "--postcopy", "allowed", "--link-timeout", "3s",
                                                           "--timeout", "300s"])
        try #require(running.wait(forPhase: .postcopy, timeout: .seconds(120)), "the migration never reached postcopy")
        try lab.lab.setNIC("a", nic: 0, up: false)
        Thread.sleep(forTimeInterval: 1)
        try lab.lab.setNIC("a", nic: 1, up: false)
        Thread.sleep(forTimeInterval: 6)  // twice the link timeout, with no NIC at all
        try lab.lab.setNIC("a", nic: 0, up: true)
        try lab.lab.setNIC("a", nic: 1, up: true)
        let (result, report) = try running.finish(timeout: .seconds(180))
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        let r = try #require(report)
        #expect(r.postcopy?.completedAt != nil, "\(r.text)")
        #expect(r.events.contains { $0.what.contains("channel") && $0.what.contains("failed") }, "no channel failed: \(r.text)")
        try lab.expectRunningAndHealthy("hot", on: "b")
        lab.expectAbsent("hot", on: "a")
    }

    @Test("in postcopy `ferry migrate` killed: both QEMUs pause; `ferry migrate` run again resumes the migration in a new session, and the VM completes at the destination")
    func migrateKilledInPostcopy() throws {
        let lab = try TestLab(nics: 2, rate: "100mbit")
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("hot", memory: 256, fill: 128, dirty: Self.dirty)
        let running = RunningMigration(lab, "hot", extra: ["--converge", "postcopy", "--postcopy", "allowed", "--timeout", "300s"])
        try #require(running.wait(forPhase: .postcopy, timeout: .seconds(120)), "the migration never reached postcopy")
        let pids = ChaosTests.pids(of: [Env.ferry, "migrate", "hot"])
        try #require(!pids.isEmpty, "no ferry migrate process to kill")
        for pid in pids { kill(pid, SIGKILL) }
        _ = try running.finish(timeout: .seconds(30))
        // The record says committed into postcopy: a second `ferry migrate` resumes it.
        let (result, report) = try lab.migrate("hot", extra: ["--timeout", "300s"])
        try Self.expectResumed(lab, result, report)
    }

    /// The migration succeeded after a resume, and the VM runs intact at the destination only.
    static func expectResumed(_ lab: TestLab, _ result: CommandResult, _ report: MigrationReport?) throws {
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        let r = try #require(report)
        #expect(r.postcopy?.resumedAt?.isEmpty == false, "\(r.text)")
        #expect(r.postcopy?.completedAt != nil, "\(r.text)")
        try lab.expectRunningAndHealthy("hot", on: "b")
        lab.expectAbsent("hot", on: "a")
    }

    @Test("in postcopy the destination's `ferry serve` killed and restarted: `ferry migrate` resumes the migration in a new session with it, and the VM completes")
    func serveKilledInPostcopy() throws {
        let lab = try TestLab(nics: 2, rate: "100mbit")
        let serve = try lab.serve(on: "b")
        _ = try lab.startDemoVM("hot", memory: 256, fill: 128, dirty: Self.dirty)
        let running = RunningMigration(lab, "hot", extra: ["--converge", "postcopy", "--postcopy", "allowed", "--timeout", "300s"])
        try #require(running.wait(forPhase: .postcopy, timeout: .seconds(120)), "the migration never reached postcopy")
        kill(serve, SIGKILL)
        _ = ProcessStats.waitForExit(pid: serve, timeout: .seconds(5))
        Thread.sleep(forTimeInterval: 1)
        try lab.serve(on: "b")  // as systemd would
        let (result, report) = try running.finish(timeout: .seconds(180))
        try Self.expectResumed(lab, result, report)
    }

    /// A lab whose destination cannot take postcopy (its daemon says it has no
    /// userfaultfd), and a light guest on a.
    static func labWithoutUserfaultfd() throws -> TestLab {
        let lab = try TestLab(nics: 1)
        try lab.serve(on: "b", prelude: "export FERRY_TEST_NO_USERFAULTFD=1")
        _ = try lab.startDemoVM("vm1", memory: 128, fill: 16, dirty: 1)
        return lab
    }

    @Test("a destination that cannot be a postcopy destination (no userfaultfd) refuses postcopy before anything moves, and the VM stays")
    func refusedWithoutUserfaultfd() throws {
        let lab = try Self.labWithoutUserfaultfd()
        let (refused, report) = try lab.migrate("vm1", extra: ["--converge", "postcopy", "--postcopy", "allowed"])
        #expect(refused.status == 1, "\(refused.stdout)\(refused.stderr)")
        #expect(report?.outcome == .failedVMOnSource)
        #expect(report?.error?.contains("userfaultfd") == true, "\(report?.error ?? "no report")")
        try lab.expectRunningAndHealthy("vm1", on: "a")
        lab.expectAbsent("vm1", on: "b")
    }

    @Test("--converge auto with --postcopy allowed to a destination without userfaultfd: it says so in its welcome, and the migration goes on without postcopy")
    func autoWithoutUserfaultfd() throws {
        let lab = try Self.labWithoutUserfaultfd()
        let (result, report) = try lab.migrate("vm1", extra: ["--converge", "auto", "--postcopy", "allowed"])
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        let r = try #require(report)
        #expect(r.postcopy == nil, "\(r.text)")
        #expect(r.events.contains { $0.what.contains("postcopy allowed but not possible") && $0.what.contains("userfaultfd") }, "\(r.text)")
        try lab.expectRunningAndHealthy("vm1", on: "b")
    }

    @Test("--converge postcopy without --postcopy allowed is refused at once, and nothing moves")
    func convergePostcopyNeedsAllowed() throws {
        let lab = try TestLab(nics: 1)
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("vm1", memory: 128, fill: 16, dirty: 1)
        let (result, _) = try lab.migrate("vm1", extra: ["--converge", "postcopy"])
        #expect(result.status == 64, "\(result.stdout)\(result.stderr)")
        #expect(result.stderr.contains("--postcopy allowed"), "\(result.stderr)")
        try lab.expectRunningAndHealthy("vm1", on: "a")
    }
}
