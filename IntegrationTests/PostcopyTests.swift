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

    @Test("a destination that cannot be a postcopy destination (no userfaultfd) refuses postcopy before anything moves, and the VM stays")
    func refusedWithoutUserfaultfd() throws {
        let lab = try TestLab(nics: 1)
        try lab.serve(on: "b", prelude: "export FERRY_TEST_NO_USERFAULTFD=1")
        _ = try lab.startDemoVM("vm1", memory: 128, fill: 16, dirty: 1)
        let (refused, report) = try lab.migrate("vm1", extra: ["--converge", "postcopy", "--postcopy", "allowed"])
        #expect(refused.status == 1, "\(refused.stdout)\(refused.stderr)")
        #expect(report?.outcome == .failedVMOnSource)
        #expect(report?.error?.contains("userfaultfd") == true, "\(report?.error ?? "no report")")
        try lab.expectRunningAndHealthy("vm1", on: "a")
        lab.expectAbsent("vm1", on: "b")
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
