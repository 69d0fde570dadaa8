import Foundation
import Testing
@testable import FerryMigration

@Suite("Report: the figures the daemon's metrics take from it")
struct ReportMetricsTests {
    func report(events: [String], compression: Bool) -> MigrationReport {
        var r = MigrationReport(
            vm: "vm1", outcome: .succeeded, error: nil, failedPhase: nil, startedAt: Date(), totalSeconds: 6.5,
            transferSeconds: 6, qemuDowntimeMilliseconds: 40, switchoverMilliseconds: 150, qemuTransferredBytes: 1 << 30,
            streamBytes: 1 << 30, wireBytes: 512 << 20, retransmittedBytes: 0, throughputBitsPerSecond: 1.43e9,
            multifdChannels: 0,
            channels: [.init(channel: 0, interface: "eth0", payloadBytes: 600 << 20, alive: true),
                       .init(channel: 1, interface: "eth1", payloadBytes: 300 << 20, alive: false),
                       .init(channel: 2, interface: "eth1", payloadBytes: 124 << 20, alive: true)],
            nics: [], events: events.enumerated().map { .init(at: Double($0.offset), what: $0.element) }, timeline: [],
            source: .init(host: "a"), destination: .init(host: "b"))
        if compression { r.compression = .init(mode: "auto", periods: [.init(codec: "lz4", fromSeconds: 0, toSeconds: 6)]) }
        return r
    }

    @Test("failovers are counted from the events the source notes for them")
    func failovers() {
        let r = report(events: [
            MigrationReport.channelFailedEvent(channel: 1, interface: "eth1", reason: "eth1 lost carrier", requeuedChunks: 3),
            "NIC eth1 lost carrier: 2 channel(s) failed over to the other NICs",
            MigrationReport.channelFailedEvent(channel: 5, interface: "eth1", reason: "receive: closed", requeuedChunks: 0),
            "NIC eth1 is back: 4 channel(s) opened",
        ], compression: false)
        #expect(r.channelsFailedOver == 2)
        #expect(r.payloadBytesByInterface == ["eth0": 600 << 20, "eth1": 424 << 20])
        #expect(r.compressionRatio == nil)
        #expect(r.downtimeMilliseconds == 150)
    }

    @Test("the compression ratio is the report's: channel payload over wire bytes")
    func ratio() {
        let r = report(events: [], compression: true)
        #expect(r.compressionRatio == 2)
        var paused = r
        paused.pause = .init(guestPauseMilliseconds: 52, clockOffsetMilliseconds: 0, segments: [])
        #expect(paused.downtimeMilliseconds == 52)
    }
}
