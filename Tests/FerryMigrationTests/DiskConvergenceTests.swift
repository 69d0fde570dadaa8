import Testing
@testable import FerryMigration

/// When Ferry limits a guest's writes to a disk whose copy does not converge, and by how much.
@Suite("Disk copy convergence")
struct DiskConvergenceTests {
    static let MiB: UInt64 = 1 << 20

    /// Feeds a copy that moves `copyRate` bytes a second while the guest dirties
    /// `dirtyRate` bytes a second of what it already copied, from `remaining` left, sampled
    /// every quarter second for `seconds`; the decisions made, at their times.
    static func run(_ c: inout DiskConvergence, from start: Double = 0, seconds: Double, remaining: inout Double,
                    sent: inout Double, copyRate: Double, dirtyRate: Double) -> [(at: Double, DiskConvergence.Decision)] {
        var decisions: [(Double, DiskConvergence.Decision)] = []
        var t = start
        while t < start + seconds {
            t += 0.25
            // What the guest may dirty is held to the limit in force.
            let dirty = min(dirtyRate, c.limitBytesPerSecond.map { Double($0) } ?? .infinity)
            remaining = max(0, remaining + (dirty - copyRate) * 0.25)
            sent += copyRate * 0.25
            if let d = c.observe(now: t, remaining: UInt64(remaining), sent: UInt64(sent)) { decisions.append((t, d)) }
        }
        return decisions
    }

    @Test("a copy that outpaces the guest's writes is never limited")
    func converging() {
        var c = DiskConvergence()
        var remaining = Double(512 * Self.MiB), sent = 0.0
        let decisions = Self.run(&c, seconds: 30, remaining: &remaining, sent: &sent, copyRate: 100e6, dirtyRate: 20e6)
        #expect(decisions.isEmpty)
        #expect(c.limitBytesPerSecond == nil)
        #expect(remaining == 0)
    }

    @Test("a guest that writes as fast as its copy moves is limited to half the copy's rate after a window, and the copy then converges")
    func limited() throws {
        var c = DiskConvergence()
        var remaining = Double(64 * Self.MiB), sent = 0.0
        let decisions = Self.run(&c, seconds: 60, remaining: &remaining, sent: &sent, copyRate: 12e6, dirtyRate: 30e6)
        let first = try #require(decisions.first)
        #expect(first.at >= DiskConvergence.window && first.at <= DiskConvergence.window + 0.5)
        guard case .limit(let limit, let left, let rate) = first.1 else { Issue.record("no limit"); return }
        #expect(abs(rate - 12e6) < 1e5)
        #expect(limit == UInt64(rate / 2))
        #expect(left > 64 * Self.MiB, "what was left had grown")
        // Half the copy's rate is enough here: one limit, and nothing left at the end.
        #expect(decisions.count == 1)
        #expect(remaining == 0)
    }

    @Test("a limit that is not enough is halved, a window later, down to a floor that follows a slow copy")
    func halved() {
        var c = DiskConvergence()
        var remaining = Double(64 * Self.MiB), sent = 0.0
        // The copy's rate collapses to what the limit lets through plus nothing: model a copy
        // that moves only as fast as the guest is allowed to dirty, so no limit converges it.
        var decisions: [DiskConvergence.Decision] = []
        var t = 0.0
        var copyRate = 40e6
        while t < 120 {
            t += 0.25
            let dirty = min(copyRate, c.limitBytesPerSecond.map { Double($0) } ?? .infinity)
            sent += copyRate * 0.25
            remaining = max(0, remaining + (dirty - copyRate) * 0.25)
            if let d = c.observe(now: t, remaining: UInt64(remaining), sent: UInt64(sent)) { decisions.append(d) }
            copyRate = max(dirty, 0.3e6)  // still moving (above 256 KiB/s)
        }
        let limits: [UInt64] = decisions.map { decision -> UInt64 in
            guard case .limit(let limit, _, _) = decision else { return 0 }
            return limit
        }
        #expect(limits.count >= 3)
        #expect(limits.first == 20_000_000)
        // Halved each time, never below a quarter of the copy's rate; on a copy slower than
        // 4 MiB/s, below 1 MiB/s.
        for (a, b) in zip(limits, limits.dropFirst()) { #expect(b <= a / 2 + 1 && b >= a / 4, "\(a) then \(b)") }
        #expect((limits.last ?? .max) < DiskConvergence.floorBytesPerSecond, "\(limits)")
        #expect(c.limitBytesPerSecond == limits.last)
    }

    @Test("a long first pass is judged by what the copy carries, not by what is left: a terabyte at 100 MB/s, the guest idle or dirtying half the copy's rate, is never limited")
    func longFirstPass() {
        for dirty in [0.0, 50e6] {
            var c = DiskConvergence()
            var remaining = Double(1 << 40), sent = 0.0
            let decisions = Self.run(&c, seconds: 120, remaining: &remaining, sent: &sent, copyRate: 100e6, dirtyRate: dirty)
            #expect(decisions.isEmpty, "dirtying \(dirty) B/s")
        }
    }

    @Test("what is left below the link's tenth of a second is caught up: never limited, however flat")
    func caughtUp() {
        var c = DiskConvergence()
        var t = 0.0, sent = 0.0
        while t < 60 {
            t += 0.25
            sent += 200e6 * 0.25
            #expect(c.observe(now: t, remaining: 15 * Self.MiB, sent: UInt64(sent)) == nil)  // < 200 MB/s x 0.1 s
        }
    }

    @Test("a copy that hardly moves (the link lost) does not limit the guest")
    func stalled() {
        var c = DiskConvergence()
        var t = 0.0
        while t < 60 {
            t += 0.25
            #expect(c.observe(now: t, remaining: 100 * Self.MiB, sent: UInt64(t * 100_000)) == nil)
        }
        #expect(c.limitBytesPerSecond == nil)
    }
}
