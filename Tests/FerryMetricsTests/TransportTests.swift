import FerryIO
import Foundation
import Testing
@testable import FerryMetrics

/// A short path for a Unix socket (sun_path holds 107 bytes).
func temporarySocketPath() -> String {
    NSTemporaryDirectory() + "fm-\(UUID().uuidString.prefix(8)).sock"
}

/// Waits up to 2 s for `condition`.
func eventually(_ condition: () -> Bool) -> Bool {
    let deadline = ContinuousClock.now + .seconds(2)
    while ContinuousClock.now < deadline {
        if condition() { return true }
        Thread.sleep(forTimeInterval: 0.01)
    }
    return condition()
}

@Suite("Metrics: reporter to daemon over a real Unix datagram socket")
struct ReporterTests {
    @Test("started, progress and ended arrive; progress and ended add up to the totals")
    func datagramPath() throws {
        let path = temporarySocketPath()
        let metrics = HostMetrics()
        let receiver = try MetricsReceiver(path: path, metrics: metrics)
        defer { receiver.stop() }
        var mode = stat()
        #expect(stat(path, &mode) == 0 && mode.st_mode & 0o777 == 0o600)

        let reporter = MetricsReporter(socketPath: path, progressInterval: .zero)
        reporter.started(vm: "vm1", role: .source)
        reporter.progress(vm: "vm1", role: .source, nicTotals: [NICBytes(nic: "eth0", direction: .sent, bytes: 100),
                                                                  NICBytes(nic: "eth1", direction: .sent, bytes: 50)])
        reporter.progress(vm: "vm1", role: .source, nicTotals: [NICBytes(nic: "eth0", direction: .sent, bytes: 300),
                                                                  NICBytes(nic: "eth1", direction: .sent, bytes: 50)])
        reporter.ended(vm: "vm1", role: .source, MigrationEnd(
            outcome: "succeeded", totalSeconds: 4, throughputBitsPerSecond: 8e8, downtimeMilliseconds: 40,
            nicBytes: [NICBytes(nic: "eth0", direction: .sent, bytes: 1000), NICBytes(nic: "eth1", direction: .sent, bytes: 60)],
            channelsFailedOver: 1, compressionRatio: 1.25))
        // started, two progress, ended (the second progress is a datagram: eth0 grew).
        #expect(eventually { receiver.appliedCount == 4 })
        let s = PrometheusText.parse(metrics.exposition())
        #expect(s[PrometheusText.key("ferry_migrations_started_total", ["role": "source"])] == 1)
        #expect(s[PrometheusText.key("ferry_migrations_ended_total", ["role": "source", "outcome": "succeeded"])] == 1)
        #expect(s[PrometheusText.key("ferry_nic_bytes_total", ["nic": "eth0", "direction": "sent"])] == 1000)
        #expect(s[PrometheusText.key("ferry_nic_bytes_total", ["nic": "eth1", "direction": "sent"])] == 60)
        #expect(s["ferry_channels_failed_over_total"] == 1)
        #expect(s["ferry_compression_ratio"] == 1.25)
        #expect(s["ferry_migration_downtime_seconds_sum"] == 0.04)
    }

    @Test("progress is sent at most once an interval, and only what grew")
    func progressThrottle() throws {
        let path = temporarySocketPath()
        let metrics = HostMetrics()
        let receiver = try MetricsReceiver(path: path, metrics: metrics)
        defer { receiver.stop() }
        let reporter = MetricsReporter(socketPath: path, progressInterval: .seconds(60))
        reporter.started(vm: "a", role: .destination)
        for i in 1...50 {
            reporter.progress(vm: "a", role: .destination, nicTotals: [NICBytes(nic: "eth0", direction: .received, bytes: UInt64(i))])
        }
        reporter.ended(vm: "a", role: .destination, MigrationEnd(outcome: "succeeded", totalSeconds: 1,
                                                               nicBytes: [NICBytes(nic: "eth0", direction: .received, bytes: 70)]))
        #expect(eventually { receiver.appliedCount == 2 })
        let s = PrometheusText.parse(metrics.exposition())
        #expect(s[PrometheusText.key("ferry_nic_bytes_total", ["nic": "eth0", "direction": "received"])] == 70)
    }

    @Test("with no daemon, reporting neither fails nor waits")
    func noDaemon() {
        let reporter = MetricsReporter(socketPath: temporarySocketPath())
        let start = ContinuousClock.now
        for _ in 0..<1000 {
            reporter.started(vm: "x", role: .source)
            reporter.ended(vm: "x", role: .source, MigrationEnd(outcome: "succeeded", totalSeconds: 1))
        }
        #expect(ContinuousClock.now - start < .seconds(2))
    }

    @Test("a full daemon queue drops events instead of blocking the sender")
    func fullQueue() throws {
        let path = temporarySocketPath()
        // A bound socket nobody reads: its queue fills.
        let silent = try UnixDatagram.receiver(path: path)
        defer {
            silent.close()
            unlink(path)
        }
        let reporter = MetricsReporter(socketPath: path)
        let start = ContinuousClock.now
        for _ in 0..<5000 { reporter.started(vm: "x", role: .source) }
        #expect(ContinuousClock.now - start < .seconds(2))
    }

    @Test("the daemon drops datagrams that are not events and goes on")
    func garbage() throws {
        let path = temporarySocketPath()
        let metrics = HostMetrics()
        let receiver = try MetricsReceiver(path: path, metrics: metrics)
        defer { receiver.stop() }
        let sender = try UnixDatagram.sender()
        sender.send(Array("{\"v\":1,\"kind\":\"nonsense\"}".utf8), to: path)
        sender.send([UInt8](repeating: 65, count: MetricsEvent.maximumByteCount + 100), to: path)
        MetricsReporter(socketPath: path).started(vm: "x", role: .update)
        #expect(eventually { receiver.appliedCount == 1 && receiver.droppedCount == 2 })
        #expect(PrometheusText.parse(metrics.exposition())[PrometheusText.key("ferry_migrations_started_total", ["role": "update"])] == 1)
    }
}
