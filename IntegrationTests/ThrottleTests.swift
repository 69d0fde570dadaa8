import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import FerryWire
import Foundation
import Testing

/// `--converge`: a guest that dirties its memory faster than the link carries it.
@Suite("Convergence by throttling", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest"))
struct ThrottleTests {
    /// One NIC at 300 Mbit/s (about 36 MiB/s) and a guest that rewrites its memory as fast
    /// as its vCPU can for half of every 100 ms (the rate it asks for is more than TCG
    /// gives it): a writer the throttle slows in proportion.
    static let rate = "300mbit", dirty = 4000

    @Test("a guest writing faster than the link: Ferry throttles its vCPUs just enough, the migration completes, the guest's memory is intact")
    func throttles() throws {
        let lab = try TestLab(nics: 1, rate: Self.rate)
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("hot", memory: 192, fill: 48, dirty: Self.dirty)
        let (result, report) = try lab.migrate("hot", extra: ["--converge", "throttle", "--timeout", "120s"])
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        let r = try #require(report)
        let account = try #require(r.convergence, "the report has no convergence account")
        print("throttle: \(account.summary)\n\(r.text.split(separator: "\n").filter { $0.contains("total") || $0.contains("downtime") }.joined(separator: "\n"))")
        #expect(account.mode == .throttle)
        #expect(account.peakThrottlePercent > 0, "the guest was never throttled: \(r.text)")
        #expect(account.peakDirtyBytesPerSecond > 18 << 20, "QEMU never saw the guest dirty more than half the link: \(account.summary)")
        try lab.expectRunningAndHealthy("hot", on: "b")
        lab.expectAbsent("hot", on: "a")
    }

    @Test("--converge none: the same guest never finishes, and --timeout leaves it running on the source",
          .enabled(if: Env.runSoaks, "with the soaks (FERRY_SOAKS=1): it waits out its timeout"))
    func neverFinishesWithout() throws {
        let lab = try TestLab(nics: 1, rate: Self.rate)
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("hot", memory: 192, fill: 48, dirty: Self.dirty)
        let (result, report) = try lab.migrate("hot", extra: ["--converge", "none", "--timeout", "25s"])
        #expect(result.status == 1, "\(result.stdout)\(result.stderr)")
        #expect(report?.outcome == .failedVMOnSource && report?.convergence == nil)
        try lab.expectRunningAndHealthy("hot", on: "a")
    }
}
