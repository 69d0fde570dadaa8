import FerryIO
import FerryMetrics
import FerryMigration
import FerryTransport
import FerryVM
import Foundation

extension MigrationEnd {
    /// The figures of a report, for the daemon's metrics. `direction`: how the NIC bytes
    /// crossed this host's NICs (a source sends).
    init(report: MigrationReport, direction: NICDirection = .sent) {
        self.init(outcome: report.outcome.rawValue, totalSeconds: report.totalSeconds,
                  throughputBitsPerSecond: report.throughputBitsPerSecond,
                  downtimeMilliseconds: report.succeeded ? report.downtimeMilliseconds : nil,
                  nicBytes: report.payloadBytesByInterface.map { NICBytes(nic: $0.key, direction: direction, bytes: $0.value) },
                  channelsFailedOver: report.channelsFailedOver,
                  compressionRatio: report.compressionRatio)
    }
}

extension MetricsReporter {
    /// The reporter to this host's daemon (`<run>/metrics.sock`).
    convenience init(paths: StatePaths) {
        self.init(runDirectory: paths.runDirectory)
    }

    /// A migration's report: how it ended, for the daemon's metrics.
    func ended(report: MigrationReport, role: MigrationRole) {
        ended(vm: report.vm, role: role, MigrationEnd(report: report))
    }

    /// A source's NIC byte totals so far, from its progress (at most once a second).
    func progress(vm: String, channels: [ChannelStats]) {
        guard !channels.isEmpty else { return }
        let totals = channels.reduce(into: [String: UInt64]()) { $0[$1.interface, default: 0] += $1.payloadBytes }
        progress(vm: vm, role: .source, nicTotals: totals.map { NICBytes(nic: $0.key, direction: .sent, bytes: $0.value) })
    }
}

/// `ferry serve --metrics`: the registry, the `/metrics` responder and the socket other
/// processes report to. The scrape-time figures come from the daemon's admission queue,
/// the outgoing slot files and the VM store.
final class ServeMetrics: Sendable {
    let metrics: HostMetrics
    let server: MetricsServer
    let receiver: MetricsReceiver
    /// The daemon's migration server, once it exists (it is made after the metrics, whose
    /// hook it takes).
    let incoming = Locked<MigrationServer?>(nil)

    init(address: MetricsAddress, store: VMStore) throws {
        let paths = store.paths
        let incoming = self.incoming
        let metrics = HostMetrics {
            var snapshot = HostSnapshot()
            if let queue = incoming.current?.incoming {
                snapshot.incomingRunning = queue.running.count
                snapshot.incomingQueued = queue.queued.count
            }
            let outgoing = OutgoingSlot.snapshot(runDirectory: paths.runDirectory)
            snapshot.outgoingRunning = outgoing.holders.count
            snapshot.outgoingQueued = outgoing.waiting.count
            for entry in store.entries() { snapshot.vmsByPhase[entry.stateName, default: 0] += 1 }
            return snapshot
        }
        self.metrics = metrics
        receiver = try MetricsReceiver(path: paths.runDirectory + "/" + MetricsReporter.socketName, metrics: metrics)
        server = try MetricsServer(address: address) { metrics.exposition() }
    }

    /// The hook for ``MigrationServer/Options/onIncoming``: the daemon's own destination
    /// sessions go straight into the registry.
    var onIncoming: @Sendable (IncomingMigrationNotice) -> Void {
        { [metrics] notice in
            switch notice {
            case .started(let vm):
                metrics.apply(MetricsEvent(kind: .started, vm: vm, role: .destination))
            case .ended(let vm, let outcome, let seconds, let received):
                let nics = received.map { NICBytes(nic: $0.key, direction: .received, bytes: $0.value) }
                metrics.apply(MetricsEvent(vm: vm, role: .destination, end: MigrationEnd(outcome: outcome, totalSeconds: seconds, nicBytes: nics),
                                           nicDeltas: nics))
            }
        }
    }
}
