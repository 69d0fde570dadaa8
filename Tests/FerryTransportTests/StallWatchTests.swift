import Testing
@testable import FerryTransport

@Suite("Stall watch: dead channels, not idle ones")
struct StallWatchTests {
    @Test("a channel idle for seconds that sends again is young, not stalled (the false failover of issue 18)")
    func idleThenSend() {
        var watch = StallWatch(limitMilliseconds: 1000)
        // Idle: nothing outstanding while the last acknowledgement grows old.
        for tick in 0..<14 {
            #expect(watch.check(channel: 1, unackedSegments: 0, millisecondsSinceLastAck: UInt32(tick * 100), now: Double(tick) / 10) == nil)
        }
        // It sends a chunk: TCP's last acknowledgement is 1.4 s old, the data is new.
        #expect(watch.check(channel: 1, unackedSegments: 12, millisecondsSinceLastAck: 1400, now: 1.4) == nil)
        #expect(watch.check(channel: 1, unackedSegments: 8, millisecondsSinceLastAck: 1500, now: 1.5) == nil)
        // Acknowledged in full: back to idle.
        #expect(watch.check(channel: 1, unackedSegments: 0, millisecondsSinceLastAck: 20, now: 1.6) == nil)
    }

    @Test("data outstanding with no acknowledgement past the limit is a dead channel, found within one period")
    func dead() {
        var watch = StallWatch(limitMilliseconds: 1000)
        var failedAt: Double?
        for tick in 0...20 {
            let now = 5 + Double(tick) / 10
            // The peer stopped acknowledging at t=5.0, when this data went out.
            if let age = watch.check(channel: 3, unackedSegments: 40, millisecondsSinceLastAck: UInt32(tick * 100), now: now) {
                failedAt = now
                #expect(age > 1000 && age <= 1100)
                break
            }
        }
        #expect(failedAt == 6.1)
    }

    @Test("a busy channel whose acknowledgements keep coming is never stalled, however long its data stays outstanding")
    func busy() {
        var watch = StallWatch(limitMilliseconds: 1000)
        for tick in 0..<100 {
            #expect(watch.check(channel: 0, unackedSegments: 200, millisecondsSinceLastAck: 15, now: Double(tick) / 10) == nil)
        }
        // Then the path dies: the acknowledgements' age decides.
        #expect(watch.check(channel: 0, unackedSegments: 200, millisecondsSinceLastAck: 900, now: 10.9) == nil)
        #expect(watch.check(channel: 0, unackedSegments: 200, millisecondsSinceLastAck: 1001, now: 11.0) == 1001)
    }

    @Test("channels are watched apart, and a forgotten channel starts afresh")
    func channelsApart() {
        var watch = StallWatch(limitMilliseconds: 500)
        #expect(watch.check(channel: 0, unackedSegments: 1, millisecondsSinceLastAck: 5000, now: 0) == nil)
        #expect(watch.check(channel: 1, unackedSegments: 0, millisecondsSinceLastAck: 5000, now: 0) == nil)
        #expect(watch.check(channel: 0, unackedSegments: 1, millisecondsSinceLastAck: 5600, now: 0.6) == 600)
        #expect(watch.check(channel: 1, unackedSegments: 1, millisecondsSinceLastAck: 5600, now: 0.6) == nil)
        watch.forget(channel: 0)
        #expect(watch.check(channel: 0, unackedSegments: 1, millisecondsSinceLastAck: 6000, now: 1.0) == nil)
    }
}
