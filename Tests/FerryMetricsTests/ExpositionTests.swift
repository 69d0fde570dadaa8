import Foundation
import Testing
@testable import FerryMetrics

@Suite("Metrics: events in, exposition out")
struct ExpositionTests {
    func ended(_ outcome: String, nics: [NICBytes] = [], throughput: Double? = nil, downtimeMs: Double? = nil,
               failedOver: Int = 0, ratio: Double? = nil) -> MetricsEvent {
        MetricsEvent(vm: "vm1", role: .source,
                     end: MigrationEnd(outcome: outcome, totalSeconds: 3, throughputBitsPerSecond: throughput, downtimeMilliseconds: downtimeMs,
                                       nicBytes: nics, channelsFailedOver: failedOver, compressionRatio: ratio),
                     nicDeltas: nics)
    }

    @Test("counters, histograms and the ratio gauge carry what the events said")
    func eventsToText() {
        let metrics = HostMetrics()
        metrics.apply(MetricsEvent(kind: .started, vm: "vm1", role: .source))
        metrics.apply(MetricsEvent(kind: .started, vm: "vm2", role: .destination))
        var bytes = MetricsEvent(kind: .bytes, vm: "vm1", role: .source)
        bytes.nics = [NICBytes(nic: "eth0", direction: .sent, bytes: 1000)]
        metrics.apply(bytes)
        metrics.apply(ended("succeeded", nics: [NICBytes(nic: "eth0", direction: .sent, bytes: 500), NICBytes(nic: "eth1", direction: .sent, bytes: 700)],
                            throughput: 1.5e9, downtimeMs: 120, failedOver: 2, ratio: 1.8))
        metrics.apply(ended("failed-vm-on-source", throughput: 3e7))
        let s = PrometheusText.parse(metrics.exposition())
        #expect(s[PrometheusText.key("ferry_migrations_started_total", ["role": "source"])] == 1)
        #expect(s[PrometheusText.key("ferry_migrations_started_total", ["role": "destination"])] == 1)
        #expect(s[PrometheusText.key("ferry_migrations_started_total", ["role": "update"])] == 0)
        #expect(s[PrometheusText.key("ferry_migrations_ended_total", ["role": "source", "outcome": "succeeded"])] == 1)
        #expect(s[PrometheusText.key("ferry_migrations_ended_total", ["role": "source", "outcome": "failed-vm-on-source"])] == 1)
        #expect(s[PrometheusText.key("ferry_nic_bytes_total", ["nic": "eth0", "direction": "sent"])] == 1500)
        #expect(s[PrometheusText.key("ferry_nic_bytes_total", ["nic": "eth1", "direction": "sent"])] == 700)
        #expect(s["ferry_channels_failed_over_total"] == 2)
        #expect(s["ferry_compression_ratio"] == 1.8)
        #expect(s["ferry_migration_throughput_bits_per_second_count"] == 2)
        #expect(s["ferry_migration_throughput_bits_per_second_sum"] == 1.5e9 + 3e7)
        #expect(s[PrometheusText.key("ferry_migration_throughput_bits_per_second_bucket", ["le": "50000000.0"])] == 1)
        #expect(s[PrometheusText.key("ferry_migration_throughput_bits_per_second_bucket", ["le": "2500000000.0"])] == 2)
        #expect(s[PrometheusText.key("ferry_migration_throughput_bits_per_second_bucket", ["le": "+Inf"])] == 2)
        #expect(s["ferry_migration_downtime_seconds_count"] == 1)
        #expect(s[PrometheusText.key("ferry_migration_downtime_seconds_bucket", ["le": "0.1"])] == 0)
        #expect(s[PrometheusText.key("ferry_migration_downtime_seconds_bucket", ["le": "0.25"])] == 1)
    }

    @Test("the histograms' buckets span 10 Mbit/s to 100 Gbit/s and 10 ms to 10 s")
    func buckets() {
        #expect(HostMetrics.throughputBuckets.first == 1e7 && HostMetrics.throughputBuckets.last == 1e11)
        #expect(HostMetrics.downtimeBuckets.first == 0.01 && HostMetrics.downtimeBuckets.last == 10)
        #expect(HostMetrics.throughputBuckets == HostMetrics.throughputBuckets.sorted())
    }

    @Test("queues and VMs by phase are read at scrape time; a phase that empties shows 0")
    func scrapeTime() {
        let picture = LockedBox(HostSnapshot(incomingRunning: 2, incomingQueued: 3, outgoingRunning: 1, outgoingQueued: 4,
                                             vmsByPhase: ["running": 2, "damaged": 1]))
        let metrics = HostMetrics { picture.value }
        var s = PrometheusText.parse(metrics.exposition())
        #expect(s[PrometheusText.key("ferry_migrations_running", ["direction": "incoming"])] == 2)
        #expect(s[PrometheusText.key("ferry_migrations_queued", ["direction": "incoming"])] == 3)
        #expect(s[PrometheusText.key("ferry_migrations_running", ["direction": "outgoing"])] == 1)
        #expect(s[PrometheusText.key("ferry_migrations_queued", ["direction": "outgoing"])] == 4)
        #expect(s[PrometheusText.key("ferry_vms", ["phase": "running"])] == 2)
        #expect(s[PrometheusText.key("ferry_vms", ["phase": "damaged"])] == 1)
        picture.value = HostSnapshot(vmsByPhase: ["paused": 1])
        s = PrometheusText.parse(metrics.exposition())
        #expect(s[PrometheusText.key("ferry_vms", ["phase": "running"])] == 0)
        #expect(s[PrometheusText.key("ferry_vms", ["phase": "paused"])] == 1)
        #expect(s[PrometheusText.key("ferry_migrations_queued", ["direction": "incoming"])] == 0)
    }

    @Test("labels from other processes are checked: unknown outcomes are 'other', bad NIC names are dropped")
    func hostileLabels() {
        let metrics = HostMetrics()
        metrics.apply(ended("\"}\nferry_evil 1", nics: [NICBytes(nic: "eth0\"} 9", direction: .sent, bytes: 5),
                                                        NICBytes(nic: "a-very-long-interface-name", direction: .sent, bytes: 5)],
                            throughput: .nan, downtimeMs: -5, ratio: .infinity))
        let text = metrics.exposition()
        let s = PrometheusText.parse(text)
        #expect(s[PrometheusText.key("ferry_migrations_ended_total", ["role": "source", "outcome": "other"])] == 1)
        #expect(!text.contains("evil"))
        #expect(!text.contains("ferry_nic_bytes_total{"))
        #expect(s["ferry_migration_throughput_bits_per_second_count"] == 0)
        #expect(s["ferry_migration_downtime_seconds_count"] == 0)
        #expect(s["ferry_compression_ratio"] == 0)
    }

    @Test("NIC labels are capped")
    func nicCap() {
        let metrics = HostMetrics()
        var event = MetricsEvent(kind: .bytes, vm: "vm", role: .source)
        event.nics = (0..<(HostMetrics.maximumNICs + 10)).map { NICBytes(nic: "n\($0)", direction: .received, bytes: 1) }
        metrics.apply(event)
        let series = PrometheusText.parse(metrics.exposition()).keys.filter { $0.hasPrefix("ferry_nic_bytes_total{") }
        #expect(series.count == HostMetrics.maximumNICs)
    }

    @Test("an event survives its datagram encoding; garbage and other versions do not decode")
    func eventCoding() {
        let event = ended("succeeded", nics: [NICBytes(nic: "eth0", direction: .received, bytes: 42)], throughput: 1e9, downtimeMs: 80, failedOver: 1, ratio: 2)
        #expect(MetricsEvent.decode(event.encoded) == event)
        #expect(MetricsEvent.decode(Array("not json".utf8)) == nil)
        var other = event
        other.v = 2
        #expect(MetricsEvent.decode(other.encoded) == nil)
        #expect(MetricsEvent.decode([UInt8](repeating: 32, count: MetricsEvent.maximumByteCount + 1)) == nil)
    }

    @Test("the parser reads labels with escapes, special values, and skips comments")
    func parser() {
        let text = """
            # HELP x help
            # TYPE x counter
            x 3
            y{b="2",a="q\\"uote"} 1.5e3 1700000000
            z{le="+Inf"} +Inf

            broken{a="1" 2
            """
        let s = PrometheusText.parse(text)
        #expect(s["x"] == 3)
        #expect(s[PrometheusText.key("y", ["a": "q\"uote", "b": "2"])] == 1500)
        #expect(s[PrometheusText.key("z", ["le": "+Inf"])] == .infinity)
        #expect(s.count == 3)
    }
}

/// A value shared with a `@Sendable` closure.
final class LockedBox<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T
    init(_ value: T) { stored = value }
    var value: T {
        get { lock.withLock { stored } }
        set { lock.withLock { stored = newValue } }
    }
}
