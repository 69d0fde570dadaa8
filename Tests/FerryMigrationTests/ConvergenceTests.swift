@testable import FerryMigration
import Foundation
import Testing

@Suite("Convergence: how much to throttle a guest that writes faster than the link")
struct ConvergenceTests {
    let mib = 1048576.0

    @Test("a guest that dirties less than half the carried rate is never throttled")
    func noThrottleWhenItConverges() {
        let policy = ConvergencePolicy()
        #expect(policy.needed(dirtyBytesPerSecond: 50 * mib, carriedBytesPerSecond: 117 * mib, current: 0) == 0)
        let none = policy.parameters(needed: 0, current: 0)
        #expect(none.initial == nil && none.increment == nil)
        #expect(policy.needed(dirtyBytesPerSecond: 0, carriedBytesPerSecond: 117 * mib, current: 0) == 0)
        #expect(policy.needed(dirtyBytesPerSecond: 50 * mib, carriedBytesPerSecond: 0, current: 0) == 0, "no rate known yet: no decision")
    }

    @Test("issue 17's guest: 111 MiB/s over 1 Gbit/s needs the least throttle that halves each pass, and keeps over half its rate")
    func issueGuest() {
        let policy = ConvergencePolicy()
        let needed = policy.needed(dirtyBytesPerSecond: 111 * mib, carriedBytesPerSecond: 117 * mib, current: 0)
        // 1 - 58.5/111 = 47.3%: 48 rounds up, so the throttled guest dirties at most half the link.
        #expect(needed == 48)
        let allowed: Double = 0.5 * 117
        let throttled: Double = 111 * (1 - Double(needed) / 100)
        let oneLess: Double = 111 * (1 - Double(needed - 1) / 100)
        #expect(throttled <= allowed)
        #expect(oneLess > allowed, "one percent less would not do")
        let start = policy.parameters(needed: needed, current: 0)
        #expect(start.initial == 48 && start.increment == nil, "before QEMU throttles: where it starts")
    }

    @Test("under a throttle, the rate QEMU measures is the throttled one: the guest's own rate is worked back from it")
    func underThrottle() {
        let policy = ConvergencePolicy()
        // Throttled 40%, the guest still dirties 66.6 MiB/s: unthrottled it would write 111.
        let needed = policy.needed(dirtyBytesPerSecond: 66.6 * mib, carriedBytesPerSecond: 117 * mib, current: 40)
        #expect(needed == 48)
        let step = policy.parameters(needed: needed, current: 40)
        #expect(step.initial == nil && step.increment == 8, "QEMU adds the step at its next pass")
        // Already enough: QEMU's step stays the least it can be.
        #expect(policy.parameters(needed: 30, current: 40).increment == 1)
    }

    @Test("a guest whose dirty rate does not fall as the throttle rises (it rewrites its whole working set each pass): the next step goes half way to the ceiling")
    func saturated() {
        let policy = ConvergencePolicy()
        let before = ConvergencePolicy.Measurement(throttlePercent: 25, dirtyBytesPerSecond: 37 * mib)
        // At 37% the model promised 37 x 0.63 / 0.75 = 31 MiB/s; the guest still dirtied 36.
        let stuck = policy.needed(dirtyBytesPerSecond: 36 * mib, carriedBytesPerSecond: 40 * mib, current: 37, before: before)
        #expect(stuck == 37 + (99 - 37 + 1) / 2)
        // One that fell as promised follows the model.
        let followed = policy.needed(dirtyBytesPerSecond: 31 * mib, carriedBytesPerSecond: 40 * mib, current: 37, before: before)
        #expect(followed == policy.needed(dirtyBytesPerSecond: 31 * mib, carriedBytesPerSecond: 40 * mib, current: 37))
        #expect(followed < stuck)
        // Never past the ceiling.
        #expect(ConvergencePolicy(ceiling: 70).needed(dirtyBytesPerSecond: 36 * mib, carriedBytesPerSecond: 40 * mib, current: 60,
                                                      before: .init(throttlePercent: 50, dirtyBytesPerSecond: 37 * mib)) == 70)
    }

    @Test("the link slowing down asks for more; the ceiling caps it")
    func slowerLinkAndCeiling() {
        let policy = ConvergencePolicy()
        let fast = policy.needed(dirtyBytesPerSecond: 100 * mib, carriedBytesPerSecond: 117 * mib, current: 0)
        let slow = policy.needed(dirtyBytesPerSecond: 100 * mib, carriedBytesPerSecond: 40 * mib, current: 0)
        #expect(slow > fast && slow == 80)
        #expect(ConvergencePolicy(ceiling: 60).needed(dirtyBytesPerSecond: 100 * mib, carriedBytesPerSecond: 40 * mib, current: 0) == 60)
        #expect(ConvergencePolicy(ceiling: 500).ceiling == 99 && ConvergencePolicy(ceiling: 0).ceiling == 1)
    }

    @Test("the report's account: when the throttle began, its peak, the guest's peak dirty rate")
    func account() {
        var account = ConvergenceAccount(mode: .auto, ceilingPercent: 99)
        #expect(account.summary.contains("no throttle needed"))
        account.points = [.init(at: 4.2, throttlePercent: 48, dirtyBytesPerSecond: 111 << 20),
                          .init(at: 6.0, throttlePercent: 56, dirtyBytesPerSecond: 60 << 20)]
        account.peakDirtyBytesPerSecond = 111 << 20
        #expect(account.throttledAt == 4.2 && account.peakThrottlePercent == 56)
        #expect(account.summary.contains("throttled from 4.2 s, up to 56%") && account.summary.contains("111.0 MiB/s"), "\(account.summary)")
    }

    @Test("auto turns to postcopy when a pass under the ceiling still needs more, or after as long again as the first pass, never for a guest that converges")
    func postcopySwitch() {
        let policy = ConvergencePolicy(ceiling: 80)
        #expect(!policy.shouldSwitchToPostcopy(secondsSinceFirstPass: 60, firstPassSeconds: 10, current: 0, needed: 0))
        #expect(!policy.shouldSwitchToPostcopy(secondsSinceFirstPass: 9, firstPassSeconds: 10, current: 40, needed: 60))
        #expect(policy.shouldSwitchToPostcopy(secondsSinceFirstPass: 10, firstPassSeconds: 10, current: 40, needed: 60))
        #expect(policy.shouldSwitchToPostcopy(secondsSinceFirstPass: 2, firstPassSeconds: 10, current: 80, needed: 80))
        #expect(!policy.shouldSwitchToPostcopy(secondsSinceFirstPass: 2, firstPassSeconds: 10, current: 80, needed: 70))
        #expect(!policy.shouldSwitchToPostcopy(secondsSinceFirstPass: 2, firstPassSeconds: 10, current: 30, needed: 80))
    }
}
