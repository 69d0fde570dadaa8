import FerryInterfaces
import Foundation
import Testing
@testable import FerryMigration

@Suite("Migration policy and report")
struct PolicyTests {
    func nic(_ name: String, speed: UInt64?, carrier: Bool = true) -> NetworkInterface {
        NetworkInterface(name: name, addresses: [InterfaceAddress(address: "10.0.0.1", prefixLength: 24)],
                         speedBitsPerSecond: speed, mtu: 1500, carrier: carrier, isLoopback: false)
    }

    @Test("one QEMU stream up to 10 Gbit/s of NICs, a multifd channel per 10 Gbit/s above")
    func multifd() {
        let g: UInt64 = 1_000_000_000
        #expect(StreamPolicy.multifdChannels(for: [nic("a", speed: g), nic("b", speed: g)], selection: .all) == 0)
        #expect(StreamPolicy.multifdChannels(for: [nic("a", speed: 10 * g)], selection: .all) == 0)
        #expect(StreamPolicy.multifdChannels(for: [nic("a", speed: 25 * g), nic("b", speed: 25 * g)], selection: .all) == 5)
        #expect(StreamPolicy.multifdChannels(for: [nic("a", speed: 100 * g), nic("b", speed: 100 * g)], selection: .all) == 8)
        #expect(StreamPolicy.multifdChannels(for: [nic("a", speed: 10 * g), nic("b", speed: 1 * g)], selection: .all) == 2)
        #expect(StreamPolicy.multifdChannels(for: [nic("a", speed: g), nic("b", speed: nil)], selection: .all) == 0)
        #expect(StreamPolicy.multifdChannels(for: [nic("a", speed: 30 * g), nic("b", speed: nil)], selection: .all) == 3)
        // Down or excluded NICs do not count.
        #expect(StreamPolicy.multifdChannels(for: [nic("a", speed: g), nic("b", speed: 40 * g, carrier: false)], selection: .all) == 0)
        #expect(StreamPolicy.multifdChannels(for: [nic("a", speed: g), nic("b", speed: 40 * g)], selection: NICSelection(argument: "-b")!) == 0)
    }

    @Test("the report reads at a glance and round-trips as JSON")
    func report() throws {
        var r = MigrationReport(
            vm: "vm1", outcome: .succeeded, error: nil, failedPhase: nil, startedAt: Date(), totalSeconds: 6.5,
            transferSeconds: 6, qemuDowntimeMilliseconds: 40, switchoverMilliseconds: 150, qemuTransferredBytes: 1 << 30,
            streamBytes: 1 << 30, wireBytes: (1 << 30) + 4096, retransmittedBytes: 1 << 20, throughputBitsPerSecond: 1.43e9,
            multifdChannels: 0,
            channels: [.init(channel: 0, interface: "eth0", payloadBytes: 600 << 20, alive: true),
                       .init(channel: 1, interface: "eth1", payloadBytes: 424 << 20, alive: false)],
            nics: [.init(interface: "eth0", localAddress: "10.0.1.1", remoteAddress: "10.0.1.2", speedBitsPerSecond: 1_000_000_000)],
            events: [.init(at: 2.5, what: "NIC eth1 lost carrier: 1 channel(s) failed over to the other NICs")],
            timeline: [.init(at: 1, interfaceBytes: ["eth0": 100, "eth1": 90])],
            source: .init(host: "a", ferryCPUSeconds: 0.5, qemuCPUSeconds: 1.5, ferryPeakRSSBytes: 64 << 20),
            destination: .init(host: "b", ferryCPUSeconds: 0.6, qemuCPUSeconds: 3, ferryPeakRSSBytes: 60 << 20))
        r.pause = .init(guestPauseMilliseconds: 52.1, clockOffsetMilliseconds: 0.2,
                        segments: [.init(name: "QEMU's final pass", milliseconds: 20), .init(name: "cont", milliseconds: 32.1)])
        let text = r.text
        for needle in ["SUCCEEDED", "vm1", "downtime", "QEMU 40 ms", "1.43 Gbit/s", "eth0", "eth1", "sent again", "lost carrier", "Ferry peak RSS",
                       "guest paused 52 ms (STOP to RESUME)", "QEMU's final pass 20.0, cont 32.1 ms"] {
            #expect(text.contains(needle), "report lacks \(needle):\n\(text)")
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let back = try decoder.decode(MigrationReport.self, from: Data(r.json.utf8))
        #expect(back.outcome == .succeeded && back.channels.count == 2 && back.timeline.count == 1)
        #expect(back.pause == r.pause)
    }
}
