import FerryIO
import Foundation

/// How any process on the host (`ferry migrate`, `ferry drain`, `ferry vm update`) tells
/// the daemon about its migrations: small JSON datagrams to `<run>/metrics.sock`
/// (``MetricsEvent``), best effort. Sending never blocks and never fails the caller: with
/// no daemon listening, or its queue full, the event is dropped and the migration goes on
/// as if metrics did not exist.
///
/// NIC bytes are given as running totals (what the data path counts); the reporter sends
/// the daemon only what grew since it last reported that migration, so progress calls and
/// the final ``ended(vm:role:_:)`` add up to the totals, never count twice.
///
/// Safe to share between threads (a drain reports several migrations at once); a
/// migration is known by its VM and role.
// `sent` and `lastProgress` are under `lock`; the rest is immutable.
public final class MetricsReporter: @unchecked Sendable {
    /// Where the daemon listens.
    public let socketPath: String
    /// The least time between two progress datagrams of one migration.
    public let progressInterval: Duration
    private let socket: UnixDatagram?
    private let lock = Monitor()
    private var sent: [Key: [NICKey: UInt64]] = [:]
    private var lastProgress: [Key: ContinuousClock.Instant] = [:]

    private struct Key: Hashable {
        var vm: String
        var role: MigrationRole
    }
    private struct NICKey: Hashable {
        var nic: String
        var direction: NICDirection
    }

    /// The socket's name in the state run directory.
    public static let socketName = "metrics.sock"

    /// A reporter to the daemon whose run directory is `runDirectory` (StatePaths.runDirectory).
    public convenience init(runDirectory: String, progressInterval: Duration = .seconds(1)) {
        self.init(socketPath: runDirectory + "/" + Self.socketName, progressInterval: progressInterval)
    }

    public init(socketPath: String, progressInterval: Duration = .seconds(1)) {
        self.socketPath = socketPath
        self.progressInterval = progressInterval
        socket = try? UnixDatagram.sender()
    }

    /// A migration started.
    public func started(vm: String, role: MigrationRole) {
        lock.withLock {
            sent[Key(vm: vm, role: role)] = [:]
            lastProgress[Key(vm: vm, role: role)] = .now
        }
        send(MetricsEvent(kind: .started, vm: vm, role: role))
    }

    /// A migration's NIC byte totals so far; sends what grew, at most once a
    /// `progressInterval` (calls in between only return). Cheap enough for every progress tick.
    public func progress(vm: String, role: MigrationRole, nicTotals: [NICBytes]) {
        let key = Key(vm: vm, role: role)
        let deltas = lock.withLock { () -> [NICBytes]? in
            if let last = lastProgress[key], ContinuousClock.now - last < progressInterval { return nil }
            lastProgress[key] = .now
            return takeDeltas(key, nicTotals)
        }
        guard let deltas, !deltas.isEmpty else { return }
        var event = MetricsEvent(kind: .bytes, vm: vm, role: role)
        event.nics = deltas
        send(event)
    }

    /// A migration ended; `end.nicBytes` are its totals.
    public func ended(vm: String, role: MigrationRole, _ end: MigrationEnd) {
        let key = Key(vm: vm, role: role)
        let deltas = lock.withLock { () -> [NICBytes] in
            defer {
                sent[key] = nil
                lastProgress[key] = nil
            }
            return takeDeltas(key, end.nicBytes)
        }
        send(MetricsEvent(vm: vm, role: role, end: end, nicDeltas: deltas))
    }

    /// What grew since the last report of `key` (lock held); totals that went down count 0.
    private func takeDeltas(_ key: Key, _ totals: [NICBytes]) -> [NICBytes] {
        var summed: [NICKey: UInt64] = [:]
        for t in totals { summed[NICKey(nic: t.nic, direction: t.direction), default: 0] &+= t.bytes }
        var already = sent[key] ?? [:]
        var deltas: [NICBytes] = []
        for (nic, total) in summed.sorted(by: { ($0.key.nic, $0.key.direction.rawValue) < ($1.key.nic, $1.key.direction.rawValue) }) {
            let before = already[nic] ?? 0
            if total > before { deltas.append(NICBytes(nic: nic.nic, direction: nic.direction, bytes: total - before)) }
            already[nic] = max(before, total)
        }
        sent[key] = already
        return deltas
    }

    private func send(_ event: MetricsEvent) {
        socket?.send(event.encoded, to: socketPath)
    }
}
