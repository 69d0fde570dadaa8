import FerryIO
import Foundation
import Metrics
import Prometheus

/// What the daemon knows only when asked: its queues and the host's VMs, read at scrape
/// time (so a scrape always shows the picture as it is, never one a missed event left).
public struct HostSnapshot: Sendable, Equatable {
    public var incomingRunning = 0
    public var incomingQueued = 0
    public var outgoingRunning = 0
    public var outgoingQueued = 0
    /// VMs of this host by phase ("running", "paused", ..., "dead", "damaged").
    public var vmsByPhase: [String: Int] = [:]

    public init(incomingRunning: Int = 0, incomingQueued: Int = 0, outgoingRunning: Int = 0, outgoingQueued: Int = 0,
                vmsByPhase: [String: Int] = [:]) {
        self.incomingRunning = incomingRunning
        self.incomingQueued = incomingQueued
        self.outgoingRunning = outgoingRunning
        self.outgoingQueued = outgoingQueued
        self.vmsByPhase = vmsByPhase
    }
}

/// The daemon's metrics: one Prometheus registry of its own (no global bootstrap, so tests
/// each make one), fed by migration events (``apply(_:)``: the daemon's own destination
/// sessions directly, other processes through ``MetricsReceiver``) and by a
/// ``HostSnapshot`` taken at every scrape.
///
/// Label values come from other processes: each is checked (roles and directions are
/// enums, outcomes a fixed set, NIC names an interface name's characters and length) and
/// NICs are capped at ``maximumNICs``, so a bad sender cannot grow the exposition without
/// bound. Events name their VM, which is not a label (one series per VM would grow forever).
// Every metric object is Sendable (the registry's own locks); `nicLabels` and `phases`
// are under `lock`; `snapshot` is immutable.
public final class HostMetrics: @unchecked Sendable {
    public let registry = PrometheusCollectorRegistry()
    /// A swift-metrics factory on this registry, for code that records through the
    /// swift-metrics API (`Counter(label:dimensions:factory:)`) without a global bootstrap.
    public var factory: any CoreMetrics.MetricsFactory { PrometheusMetricsFactory(registry: registry) }

    /// Throughput buckets, bits per second: 10 Mbit/s to 100 Gbit/s, 1-2.5-5 per decade
    /// (a 1 Gbit/s link's migrations land in one bucket, a 4 x 10G host's in another).
    public static let throughputBuckets: [Double] = [1e7, 2.5e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 2.5e10, 5e10, 1e11]
    /// Downtime buckets, seconds: 10 ms to 10 s (Ferry aims under 300 ms; seconds mean
    /// something went wrong at the switchover).
    public static let downtimeBuckets: [Double] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
    public static let outcomes: Set<String> = ["succeeded", "failed-vm-on-source", "uncertain", "failed-vm-died", "cancelled", "failed"]
    /// Distinct NIC names kept as labels; bytes for more NICs are dropped.
    public static let maximumNICs = 64

    private let lock = Monitor()
    private var nicLabels: Set<String> = []
    private var phases: Set<String> = []
    private let snapshot: @Sendable () -> HostSnapshot

    private let throughput: ValueHistogram
    private let downtime: ValueHistogram
    private let failedOver: Prometheus.Counter
    private let compressionRatio: Prometheus.Gauge

    /// `snapshot`: called at every scrape, on the scraping thread.
    public init(snapshot: @escaping @Sendable () -> HostSnapshot = { HostSnapshot() }) {
        self.snapshot = snapshot
        throughput = registry.makeValueHistogram(
            name: "ferry_migration_throughput_bits_per_second", buckets: Self.throughputBuckets,
            help: "Stream bytes over transfer time of each migration this host sent, bits per second.")
        downtime = registry.makeValueHistogram(
            name: "ferry_migration_downtime_seconds", buckets: Self.downtimeBuckets,
            help: "Guest pause at switchover of each migration this host sent (STOP to running on the destination), seconds.")
        failedOver = registry.makeCounter(
            name: "ferry_channels_failed_over_total",
            help: "Data channels that failed during a migration this host sent, their chunks sent again on the others.")
        compressionRatio = registry.makeGauge(
            name: "ferry_compression_ratio",
            help: "Stream bytes over wire bytes of the last migration this host sent (1: no gain; above 1: compression paid).")
        for role in MigrationRole.allCases {
            _ = startedCounter(role)
        }
        _ = queueGauges()
    }

    private func startedCounter(_ role: MigrationRole) -> Prometheus.Counter {
        registry.makeCounter(name: "ferry_migrations_started_total", labels: [("role", role.rawValue)],
                             help: "Migrations started on this host, by role (source: ferry migrate or drain; destination: this daemon; update: same-host).")
    }

    private func endedCounter(_ role: MigrationRole, _ outcome: String) -> Prometheus.Counter {
        registry.makeCounter(name: "ferry_migrations_ended_total", labels: [("role", role.rawValue), ("outcome", outcome)],
                             help: "Migrations ended on this host, by role and outcome.")
    }

    private func nicCounter(_ nic: String, _ direction: NICDirection) -> Prometheus.Counter {
        registry.makeCounter(name: "ferry_nic_bytes_total", labels: [("nic", nic), ("direction", direction.rawValue)],
                             help: "Migration payload bytes per NIC and direction.")
    }

    private func queueGauges() -> (incomingQueued: Prometheus.Gauge, incomingRunning: Prometheus.Gauge, outgoingQueued: Prometheus.Gauge, outgoingRunning: Prometheus.Gauge) {
        func gauge(_ name: String, _ direction: String, _ help: String) -> Prometheus.Gauge {
            registry.makeGauge(name: name, labels: [("direction", direction)], help: help)
        }
        let queued = "Migrations waiting for a place (incoming: --max-migrations; outgoing: FERRY_MAX_OUTGOING_MIGRATIONS)."
        let running = "Migrations transferring now (incoming: this daemon's; outgoing: ferry migrate or drain processes of this host)."
        return (gauge("ferry_migrations_queued", "incoming", queued), gauge("ferry_migrations_running", "incoming", running),
                gauge("ferry_migrations_queued", "outgoing", queued), gauge("ferry_migrations_running", "outgoing", running))
    }

    /// Takes one event (from a datagram or from the daemon itself).
    public func apply(_ event: MetricsEvent) {
        switch event.kind {
        case .started:
            startedCounter(event.role).increment()
        case .bytes:
            add(event.nics ?? [])
        case .ended:
            add(event.nics ?? [])
            let outcome = event.outcome.flatMap { Self.outcomes.contains($0) ? $0 : nil } ?? "other"
            endedCounter(event.role, outcome).increment()
            if let bps = event.throughputBitsPerSecond, bps.isFinite, bps >= 0 { throughput.record(bps) }
            if let ms = event.downtimeMilliseconds, ms.isFinite, ms >= 0 { downtime.record(ms / 1000) }
            if let n = event.channelsFailedOver, n > 0 { failedOver.increment(by: Int64(n)) }
            if let ratio = event.compressionRatio, ratio.isFinite, ratio > 0 { compressionRatio.set(ratio) }
        }
    }

    private func add(_ nics: [NICBytes]) {
        for entry in nics where entry.bytes > 0 && Self.isLabelValue(entry.nic, maximumLength: 15) {
            let known = lock.withLock { () -> Bool in
                if nicLabels.contains(entry.nic) { return true }
                guard nicLabels.count < Self.maximumNICs else { return false }
                nicLabels.insert(entry.nic)
                return true
            }
            if known { nicCounter(entry.nic, entry.direction).increment(by: Int64(clamping: entry.bytes)) }
        }
    }

    /// A label value of letters, digits and `-_.@` (what interface names and phases use;
    /// never a quote or backslash to escape), at most `maximumLength` (15: IFNAMSIZ).
    static func isLabelValue(_ name: String, maximumLength: Int) -> Bool {
        let bytes = Array(name.utf8)
        return (1...maximumLength).contains(bytes.count) && bytes.allSatisfy {
            ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "z")) || ($0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z"))
                || ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_")
                || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "@")
        }
    }

    /// The exposition, with the scrape-time gauges as they are now.
    public func exposition() -> String {
        let now = snapshot()
        let gauges = queueGauges()
        gauges.incomingQueued.set(Double(now.incomingQueued))
        gauges.incomingRunning.set(Double(now.incomingRunning))
        gauges.outgoingQueued.set(Double(now.outgoingQueued))
        gauges.outgoingRunning.set(Double(now.outgoingRunning))
        // A phase seen once stays, at 0, so that a series does not vanish between scrapes.
        let all = lock.withLock { () -> Set<String> in
            phases.formUnion(now.vmsByPhase.keys.filter { Self.isLabelValue($0, maximumLength: 32) })
            return phases
        }
        for phase in all {
            registry.makeGauge(name: "ferry_vms", labels: [("phase", phase)], help: "VMs of this host by phase (damaged: their state files need repair).")
                .set(Double(now.vmsByPhase[phase] ?? 0))
        }
        return registry.emitToString()
    }
}
