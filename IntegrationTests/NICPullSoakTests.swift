import FerryIO
import FerryMigration
import FerryVM
import Foundation
import Testing

/// Ping-pong migrations of one guest, a random NIC of either host pulled for a moment in
/// half of them (the control connection's NIC included): none may fail, the guest's memory
/// check must stay intact, and no channel may fail but those on the pulled NIC.
/// `FERRY_SOAK_COUNT` migrations (default 4, in CI; the figures in docs/RELIABILITY.md are
/// from 100); `FERRY_SOAK_OUT=FILE` appends the summary line.
@Suite("NIC pulls, ping-pong", .serialized, .enabled(if: Env.canRunEndToEnd && Env.runSoaks, "a soak (FERRY_SOAKS=1); needs root, QEMU and the demo guest"))
struct NICPullSoakTests {
    struct Tally: CustomStringConvertible {
        var migrations = 0, failed = 0, pulled = 0, pulledControl = 0, controlMoves = 0
        var memoryErrors = 0, healthyChannelsFailed = 0
        var seconds: [Double] = []
        var description: String {
            let sorted = seconds.sorted()
            let median = sorted.isEmpty ? 0 : sorted[sorted.count / 2]
            return "\(migrations) migrations, \(pulled) with a NIC pulled (\(pulledControl) the control connection's), "
                + "\(failed) failed, \(memoryErrors) memory errors, \(healthyChannelsFailed) healthy channels failed, "
                + "\(controlMoves) control connection moves, median \(String(format: "%.1f", median)) s"
        }
    }

    @Test("ping-pong migrations, a random NIC pulled and restored in half of them: none fails, memory intact, no healthy channel failed")
    func pingPong() throws {
        let env = ProcessInfo.processInfo.environment
        let count = env["FERRY_SOAK_COUNT"].flatMap { Int($0) } ?? 4
        let lab = try TestLab(nics: 2, rate: "300mbit")
        try lab.serve(on: "a")
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("vm1", on: "a", memory: 256, fill: 128, dirty: 2)
        var tally = Tally()
        var here = "a"
        var generator = SystemRandomNumberGenerator()
        for i in 1...count {
            let there = here == "a" ? "b" : "a"
            // Every other migration pulls; which host's NIC, which NIC and when are random.
            let pull: (host: String, nic: Int, atBytes: UInt64)? = i % 2 == 0
                ? ([here, there].randomElement(using: &generator)!, Int.random(in: 0...1, using: &generator),
                   UInt64.random(in: 4...96, using: &generator) << 20)
                : nil
            let started = ContinuousClock.now
            let run = RunningMigration(lab, "vm1", from: here, to: there)
            var pulledNIC: String?
            if let pull, run.wait(forStreamBytes: pull.atBytes) {
                try lab.lab.setNIC(pull.host, nic: pull.nic, up: false)
                pulledNIC = lab.lab.interface(nic: pull.nic)
                Thread.sleep(forTimeInterval: Double.random(in: 0.5...2.5, using: &generator))
                try lab.lab.setNIC(pull.host, nic: pull.nic, up: true)
            }
            let (result, report) = try run.finish(timeout: .seconds(180))
            tally.migrations += 1
            tally.seconds.append((ContinuousClock.now - started).seconds)
            if let pull, pulledNIC != nil {
                tally.pulled += 1
                if pull.nic == 0 { tally.pulledControl += 1 }
            }
            let r = try #require(report, "migration \(i): no report: \(result.stdout)\(result.stderr)")
            let what = "migration \(i), \(here) -> \(there)" + (pulledNIC.map { ", \(pull!.host)'s \($0) pulled" } ?? "")
            if !r.succeeded { tally.failed += 1 }
            #expect(r.succeeded, "\(what): \(r.error ?? "")")
            // A failed channel's event names its NIC: only the pulled one's may fail.
            let healthyFailed = r.events.map(\.what).filter { event in
                event.hasPrefix("channel ") && event.contains(" failed (") && !(pulledNIC.map { event.contains(" on \($0) ") } ?? false)
            }
            tally.healthyChannelsFailed += healthyFailed.count
            #expect(healthyFailed.isEmpty, "\(what): a healthy channel was failed: \(healthyFailed)")
            tally.controlMoves += r.events.filter { $0.what.hasPrefix("control connection over") }.count
            // The guest's own memory check, every heartbeat so far on the host it runs on now.
            let owner = r.succeeded ? there : here
            let console = GuestConsole(path: try lab.host(owner).store.record("vm1").paths.serialLog)
            _ = console.wait(timeout: .seconds(10)) { _ in console.lastHeartbeat != nil }
            let failures = console.heartbeats.filter { !$0.ok }.count
            tally.memoryErrors += failures
            #expect(failures == 0, "\(what): the guest's memory check failed: \(console.errorLines.prefix(3))")
            guard r.succeeded else { break }
            here = there
            // The restored NIC must have carrier again before the next migration pairs NICs.
            Thread.sleep(forTimeInterval: 0.5)
        }
        try lab.expectRunningAndHealthy("vm1", on: here)
        print("NIC-pull soak: \(tally)")
        if let path = env["FERRY_SOAK_OUT"] { appendLine("\(Date()) \(tally)", to: path) }
    }
}
