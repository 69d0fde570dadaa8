import FerryIO
import Foundation
import Testing

/// FerryIO's one way to lock (`Monitor`, its conditions, `Locked`) and `ThreadOwner`.
struct MonitorTests {
    @Test("Locked serialises its value's changes across threads")
    func lockedCounts() {
        let counter = Locked(0)
        let done = Locked(0)
        for _ in 0..<4 {
            startThread("locked-test") {
                for _ in 0..<10_000 { counter.withLock { $0 += 1 } }
                done.withLock { $0 += 1 }
            }
        }
        let deadline = ContinuousClock.now + .seconds(10)
        while done.current < 4 && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.01) }
        #expect(counter.current == 40_000)
    }

    @Test("a condition's wait times out on its own, and a signal ends it early")
    func conditionWaits() {
        let monitor = Monitor()
        let condition = monitor.makeCondition()
        let started = ContinuousClock.now
        let signalled = monitor.withLock { condition.wait(timeout: .milliseconds(50)) }
        #expect(!signalled)
        #expect(ContinuousClock.now - started >= .milliseconds(45))

        // The flag is set and signalled under the lock, so the waiter cannot miss it.
        let flag = Locked(false)
        let waited = Locked<Bool?>(nil)
        let waiterReady = Locked(false)
        startThread("monitor-test") {
            monitor.lock()
            waiterReady.withLock { $0 = true }
            var ok = true
            while !flag.current && ok { ok = condition.wait(until: .now + .seconds(10)) }
            monitor.unlock()
            waited.withLock { $0 = ok }
        }
        while !waiterReady.current { Thread.sleep(forTimeInterval: 0.001) }
        let before = ContinuousClock.now
        monitor.withLock {
            flag.withLock { $0 = true }
            condition.signal()
        }
        let deadline = ContinuousClock.now + .seconds(5)
        while waited.current == nil && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.001) }
        #expect(waited.current == true)
        #expect(ContinuousClock.now - before < .seconds(5))
    }

    @Test("a thread owner is whichever thread uses it first, and stays that")
    func ownerClaimsOnFirstUse() {
        var here = ThreadOwner()
        for _ in 0..<3 { here.check("an object of this thread") }

        // Made on this thread, owned by the one that first uses it.
        let box = OwnedBox()
        let done = Locked(false)
        startThread("owner-test") {
            box.use()
            box.use()
            done.withLock { $0 = true }
        }
        let deadline = ContinuousClock.now + .seconds(5)
        while !done.current && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.001) }
        #expect(done.current)
    }

    #if DEBUG
    @Test("debug builds stop a thread that uses another thread's object")
    func ownerAssertsInDebugBuilds() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let box = OwnedBox()
            box.use()
            let thread = Thread { box.use() }
            thread.start()
            try? await Task.sleep(for: .seconds(5))
        }
        let message = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(message.contains("OwnedBox used off its owner thread"), "\(message)")
    }
    #endif
}

/// An object one thread owns, for the tests above.
// `owner` is checked by its own `check`: a test that breaks the rule expects the crash.
private final class OwnedBox: @unchecked Sendable {
    private var owner = ThreadOwner()
    func use() { owner.check("OwnedBox") }
}
