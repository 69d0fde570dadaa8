import FerryWire
import Foundation
import Testing
@testable import FerryMigration

/// The account of the guest's pause, from both sides' moments.
@Suite("Where the pause goes")
struct SwitchoverAccountTests {
    /// A switchover at t0 (source clock), the destination's clock `skew` seconds ahead,
    /// each one-way trip 0.5 ms.
    static func moments(skew: Double) -> (SourceSwitchoverTimes, DestinationSwitchoverTimes) {
        let t0 = 1_800_000_000.0
        var s = SourceSwitchoverTimes()
        var d = DestinationSwitchoverTimes()
        s.stop = t0
        s.completed = t0 + 0.020           // QEMU's final pass: 20 ms
        d.lastByte = t0 + 0.032 + skew      // buffers and wire: 12 ms
        d.loaded = t0 + 0.040 + skew        // load: 8 ms
        d.prepareStarted = t0 + 0.041 + skew
        d.prepared = t0 + 0.043 + skew      // record: 2 ms
        s.loadedReceived = t0 + 0.0435      // one way: 0.5 ms
        s.commitStarted = t0 + 0.0445
        s.commitRecorded = t0 + 0.0465      // record: 2 ms
        s.commitSent = t0 + 0.0466
        d.commitReceived = t0 + 0.0471 + skew  // one way: 0.5 ms (from the send)
        d.committedRecorded = t0 + 0.0491 + skew
        d.resumed = t0 + 0.0521 + skew      // cont: 3 ms
        d.committedSent = t0 + 0.0525 + skew
        s.committedReceived = t0 + 0.0530
        return (s, d)
    }

    @Test("the segments follow the steps, in order, and add up to STOP to RESUME", arguments: [0.0, 5.0, -3.25])
    func segments(skew: Double) throws {
        let (s, d) = Self.moments(skew: skew)
        let pause = try #require(SwitchoverAccount.make(source: s, destination: d))
        #expect(abs(pause.clockOffsetMilliseconds - skew * 1000) < 0.01, "offset \(pause.clockOffsetMilliseconds)")
        #expect(abs(pause.guestPauseMilliseconds - 52.1) < 0.01, "pause \(pause.guestPauseMilliseconds)")
        let byName = Dictionary(uniqueKeysWithValues: pause.segments.map { ($0.name, $0.milliseconds) })
        let expected: [(String, Double)] = [
            ("QEMU's final pass", 20), ("Ferry's buffers and the wire", 12), ("destination QEMU's load", 8),
            ("destination sees it loaded", 1), ("prepared record", 2), ("loaded to the source", 0.5),
            ("source sees it loaded", 1), ("commit record", 2), ("commit to the destination", 0.6),
            ("committed record", 2), ("cont", 3),
        ]
        #expect(pause.segments.map(\.name) == expected.map(\.0))
        for (name, ms) in expected {
            #expect(abs((byName[name] ?? -1) - ms) < 0.01, "\(name): \(byName[name] ?? -1) ms, expected \(ms)")
        }
        #expect(abs(pause.segments.reduce(0) { $0 + $1.milliseconds } - pause.guestPauseMilliseconds) < 0.001)
    }

    @Test("with disks copied, the pause starts with the copies' last writes, then QEMU's final pass")
    func disks() throws {
        var (s, d) = Self.moments(skew: 0)
        s.disksFinished = s.stop! + 0.005
        let pause = try #require(SwitchoverAccount.make(source: s, destination: d))
        #expect(pause.segments.prefix(2).map(\.name) == ["the disk copies' last writes", "QEMU's final pass"])
        #expect(abs(pause.segments[0].milliseconds - 5) < 0.01 && abs(pause.segments[1].milliseconds - 15) < 0.01)
        #expect(abs(pause.segments.reduce(0) { $0 + $1.milliseconds } - pause.guestPauseMilliseconds) < 0.001)
    }

    @Test("a moment not known: its segment's time goes to the one before; no destination times, no account")
    func missing() throws {
        var (s, d) = Self.moments(skew: 0)
        d.lastByte = nil
        let pause = try #require(SwitchoverAccount.make(source: s, destination: d))
        #expect(!pause.segments.contains { $0.name == "destination QEMU's load" })
        #expect(abs((pause.segments.first { $0.name == "Ferry's buffers and the wire" }?.milliseconds ?? 0) - 20) < 0.01)
        #expect(abs(pause.segments.reduce(0) { $0 + $1.milliseconds } - pause.guestPauseMilliseconds) < 0.001)
        s.commitSent = nil
        #expect(SwitchoverAccount.make(source: s, destination: d) == nil)
        #expect(SwitchoverAccount.make(source: Self.moments(skew: 0).0, destination: DestinationSwitchoverTimes()) == nil)
    }
}

/// The downtime promise: what Ferry holds back, and what QEMU is left.
@Suite("Switchover budget")
struct SwitchoverBudgetTests {
    @Test("2 Gbit/s, one stream, 300 ms: a 20 ms window, and QEMU gets the rest minus the drain and the commit")
    func fast() {
        let b = SwitchoverBudget(targetMilliseconds: 300, rateBytesPerSecond: 250e6, fullWindow: 32 << 20,
                                 qemuBufferedBytes: SwitchoverBudget.qemuBufferedBytes(streamCount: 1))
        #expect(b.window == 5_000_000)
        #expect(abs(b.drainMilliseconds - (5_000_000.0 + Double(4 << 20)) / 250e6 * 1000) < 0.001)
        #expect(b.qemuLimitMilliseconds == 243)
        // A quarter after the first pass, half after the next, then all of it.
        let quarter = SwitchoverBudget(targetMilliseconds: 300, rateBytesPerSecond: 250e6, fullWindow: 32 << 20,
                                       qemuBufferedBytes: SwitchoverBudget.qemuBufferedBytes(streamCount: 1),
                                       share: SwitchoverBudget.share(afterSync: 2))
        #expect(quarter.qemuLimitMilliseconds == 60)
        #expect([2, 3, 4, 9].map { SwitchoverBudget.share(afterSync: $0) } == [0.25, 0.5, 1, 1])
        // What the first pass left in the window holds QEMU until it is down to the late window.
        #expect(b.holds(outstanding: 32 << 20) && b.holds(outstanding: b.window + 1))
        #expect(!b.holds(outstanding: b.window) && !b.holds(outstanding: 0))
        // Held above nothing: at 0, QEMU 7.2 never syncs its dirty bitmap before the first
        // pass's end and completes there with all the pass dirtied to send.
        #expect(SwitchoverBudget.heldLimitMilliseconds == 1)
    }

    @Test("a link too slow for the promise: QEMU keeps a tenth of the target, never nothing")
    func slow() {
        let b = SwitchoverBudget(targetMilliseconds: 300, rateBytesPerSecond: 12.5e6, fullWindow: 32 << 20,
                                 qemuBufferedBytes: SwitchoverBudget.qemuBufferedBytes(streamCount: 1))
        #expect(b.window == 2 << 20)
        #expect(b.qemuLimitMilliseconds == 30)
        let tiny = SwitchoverBudget(targetMilliseconds: 5, rateBytesPerSecond: 1e6, fullWindow: 32 << 20, qemuBufferedBytes: 0)
        #expect(tiny.qemuLimitMilliseconds == 1)
    }

    @Test("a fast link never gets a window larger than the full one")
    func capped() {
        let b = SwitchoverBudget(targetMilliseconds: 300, rateBytesPerSecond: 5e9, fullWindow: 32 << 20,
                                 qemuBufferedBytes: SwitchoverBudget.qemuBufferedBytes(streamCount: 3))
        #expect(b.window == 32 << 20)
        #expect(b.qemuLimitMilliseconds == Int((300 - Double((32 << 20) + 3 * (256 << 10)) / 5e9 * 1000 - 20).rounded(.down)))
    }
}


extension SwitchoverBudgetTests {
    @Test("the first pass's tail: the late window once less than half a second of the link is left, not before, not at nothing")
    func tail() {
        #expect(SwitchoverBudget.tailWindow(remainingBytes: 200_000_000, rateBytesPerSecond: 250e6, fullWindow: 16 << 20) == nil)
        #expect(SwitchoverBudget.tailWindow(remainingBytes: 100_000_000, rateBytesPerSecond: 250e6, fullWindow: 16 << 20) == 5_000_000)
        #expect(SwitchoverBudget.tailWindow(remainingBytes: 0, rateBytesPerSecond: 250e6, fullWindow: 16 << 20) == nil)
        // A quarter of the RAM left, up to 2 s of the link: the tail has begun (zero pages leap).
        #expect(SwitchoverBudget.tailWindow(remainingBytes: 300_000_000, totalBytes: 1_400_000_000, rateBytesPerSecond: 250e6, fullWindow: 16 << 20) == 5_000_000)
        #expect(SwitchoverBudget.tailWindow(remainingBytes: 600_000_000, totalBytes: 64 << 30, rateBytesPerSecond: 250e6, fullWindow: 16 << 20) == nil)
        // A slow link: the late window's floor.
        #expect(SwitchoverBudget.tailWindow(remainingBytes: 1_000_000, rateBytesPerSecond: 12.5e6, fullWindow: 16 << 20) == 2 << 20)
    }

    @Test("the starting window: 64 ms of the link, 16 to 32 MiB, 32 MiB when a speed is unknown")
    func startingWindow() {
        #expect(SwitchoverBudget.startingWindow(linkBitsPerSecond: 2_000_000_000) == 16 << 20)
        #expect(SwitchoverBudget.startingWindow(linkBitsPerSecond: 3_000_000_000) == 24_000_000)
        #expect(SwitchoverBudget.startingWindow(linkBitsPerSecond: 100_000_000) == 16 << 20)
        #expect(SwitchoverBudget.startingWindow(linkBitsPerSecond: 40_000_000_000) == 32 << 20)
        #expect(SwitchoverBudget.startingWindow(linkBitsPerSecond: nil) == 32 << 20)
    }
}
