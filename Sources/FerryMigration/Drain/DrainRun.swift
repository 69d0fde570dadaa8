import FerryIO
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Logging

/// Asks a daemon what its host has room for (`hostQuery`, protocol v5).
public enum HostQuery {
    public static func ask(host: String, port: UInt16, keys: KeyRing?, purpose: String = "drain",
                           timeout: Duration = .seconds(5)) throws -> HostInfoMessage {
        let socket: Socket
        do {
            socket = try Socket.connectTCP(host: host, port: port, timeout: timeout)
        } catch {
            throw VMError.io("cannot reach ferry serve at \(host):\(port): \(error) (is `ferry serve` running there?)")
        }
        defer { socket.close() }
        socket.setReceiveTimeout(timeout)
        socket.setUserTimeout(timeout)
        let control = FrameConnection(socket: socket)
        do {
            let (welcome, _) = try HandshakeRunner.source(control, keys: keys, host: HostInfo.hostname)
            guard welcome.version >= ProtocolVersion.hostQueries else {
                throw VMError.io("\(welcome.host) (\(host):\(port)) runs \(welcome.software), protocol v\(welcome.version); asking a host what it has room for needs v\(ProtocolVersion.hostQueries): update it first")
            }
            try control.send(.hostQuery, HostQueryMessage(purpose: purpose))
            return try control.expect(.hostInfo, as: HostInfoMessage.self)
        } catch let error as VMError {
            throw error
        } catch {
            throw VMError.io("ferry serve at \(host):\(port) did not answer: \(error)")
        }
    }
}

/// One VM's part in a drain.
public struct DrainVMProgress: Sendable, Codable, Equatable {
    public enum State: String, Sendable, Codable {
        case waiting, running, succeeded, failed, cancelled, uncertain
        /// Never started: the operator stopped the drain first.
        case notStarted = "not-started"
    }
    public var vm: String
    public var destination: String
    public var state: State
    public var phase: String?
    /// Of QEMU's RAM, 0...1.
    public var fraction: Double
    public var bitsPerSecond: Double
    public var note: String?
}

public struct DrainProgress: Sendable {
    public var elapsedSeconds: Double
    public var vms: [DrainVMProgress]
    /// The operator asked to stop: no new migrations start.
    public var stopping: Bool
    public var done: Int { vms.filter { ![.waiting, .running].contains($0.state) }.count }
    public var running: Int { vms.filter { $0.state == .running }.count }
    public var moved: Int { vms.filter { $0.state == .succeeded }.count }
}

/// What a drain did: each VM's outcome and its migration's report.
public struct DrainReport: Codable, Sendable {
    public struct Entry: Codable, Sendable {
        public var vm: String
        public var destination: String
        public var state: DrainVMProgress.State
        public var report: MigrationReport?
    }
    public var host: String
    public var startedAt: Date
    public var totalSeconds: Double
    public var plan: DrainPlan
    public var entries: [Entry]
    /// The operator stopped the drain (Ctrl-C, SIGTERM).
    public var stopped: Bool

    public var moved: Int { entries.filter { $0.state == .succeeded }.count }

    /// 0: every VM moved; 3: a migration's outcome is uncertain; 1: otherwise (some VM
    /// stayed here: it failed, or was never started).
    public var exitStatus: Int32 {
        if entries.contains(where: { $0.state == .uncertain }) { return 3 }
        return moved == entries.count && plan.unplaced.isEmpty ? 0 : 1
    }

    public var text: String {
        var lines = ["Drain of \(host): \(moved) of \(entries.count) VM(s) moved in \(Format.seconds(totalSeconds))"
                     + (stopped ? " (stopped by the operator)" : "")]
        for e in entries {
            var line = "  \(e.vm.padding(toLength: max(e.vm.count, 16), withPad: " ", startingAt: 0)) -> \(e.destination.padding(toLength: max(e.destination.count, 10), withPad: " ", startingAt: 0)) \(e.state.rawValue.uppercased())"
            if let r = e.report {
                line += "  \(Format.seconds(r.totalSeconds))"
                if let pause = r.pause { line += ", paused \(Format.millis(pause.guestPauseMilliseconds))" }
                else if let s = r.switchoverMilliseconds { line += ", paused <= \(Format.millis(s))" }
                if let t = r.throughputBitsPerSecond { line += ", \(Format.rate(t))" }
                if let error = r.error, e.state != .succeeded { line += "; \(error)" }
            }
            if e.state == .notStarted { line += "  (stays here)" }
            lines.append(line)
        }
        for u in plan.unplaced { lines.append("  \(u.vm.padding(toLength: max(u.vm.count, 16), withPad: " ", startingAt: 0)) -> nowhere      STAYS  (\(u.reason))") }
        let bytes = entries.compactMap(\.report).filter { $0.outcome == .succeeded }.reduce(UInt64(0)) { $0 + $1.streamBytes }
        lines.append("  moved \(Format.bytes(bytes)) of VM state; " + (exitStatus == 0 ? "this host runs no VM of the plan now" : "VMs not moved keep running here"))
        return lines.joined(separator: "\n")
    }

    public var json: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return (try? encoder.encode(self)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }
}

/// Runs a drain's plan: at most `parallel` migrations from this host at once and
/// `perDestination` to any one destination, in the plan's order, each a
/// ``SourceMigration`` on a thread of its own. A VM whose migration fails stays here and the
/// others go on. ``stopStarting()`` (the first Ctrl-C) starts no more, and lets the running
/// ones finish or roll back; ``cancelRunning()`` (the second) cancels those too, which
/// roll back until their commit point.
public final class DrainRun: @unchecked Sendable {
    public struct Options: Sendable {
        public var parallel: Int
        public var perDestination: Int
        /// The migration's options for a placement (its destination, the operator's tuning).
        public var migration: @Sendable (DrainPlan.Placement) -> MigrationOptions
        /// Called as each migration starts and with each report (metrics).
        public var started: @Sendable (String) -> Void = { _ in }
        public var ended: @Sendable (MigrationReport) -> Void = { _ in }
        /// Each migration's progress, by VM (metrics).
        public var migrationProgress: @Sendable (String, MigrationProgress) -> Void = { _, _ in }
        public init(parallel: Int, perDestination: Int, migration: @escaping @Sendable (DrainPlan.Placement) -> MigrationOptions) {
            self.parallel = parallel
            self.perDestination = perDestination
            self.migration = migration
        }
    }

    let store: VMStore
    let plan: DrainPlan
    let options: Options
    let logger: Logger
    let progress: @Sendable (DrainProgress) -> Void
    private let monitor = Monitor()
    private let changed: Monitor.Condition
    // Under `monitor`:
    private var states: [DrainVMProgress]
    private var reports: [String: MigrationReport] = [:]
    private var migrations: [String: SourceMigration] = [:]
    private var stopping = false
    private let started = ContinuousClock.now

    public init(store: VMStore, plan: DrainPlan, options: Options, logger: Logger,
                progress: @escaping @Sendable (DrainProgress) -> Void) {
        self.store = store
        self.plan = plan
        self.options = options
        self.logger = logger
        self.progress = progress
        changed = monitor.makeCondition()
        states = plan.placements.map { DrainVMProgress(vm: $0.vm, destination: $0.host, state: .waiting, phase: nil, fraction: 0, bitsPerSecond: 0) }
    }

    /// Starts no more migrations; true the first time.
    @discardableResult
    public func stopStarting() -> Bool {
        monitor.withLock {
            defer { stopping = true; changed.broadcast() }
            return !stopping
        }
    }

    /// Cancels the running migrations (each rolls back if before its commit point); the
    /// names of those that accepted.
    public func cancelRunning() -> [String] {
        let running = monitor.withLock { stopping = true; changed.broadcast(); return migrations }
        return running.compactMap { name, m in m.stop(.cancelled) == .accepted ? name : nil }.sorted()
    }

    /// Answers the `ferry migrate --postcopy-now` requests for this drain's running
    /// migrations; the names of the VMs asked about.
    public func answerPostcopyRequests() -> [String] {
        let running = monitor.withLock { migrations }
        return running.compactMap { name, migration in migration.answerPostcopyRequest() ? name : nil }.sorted()
    }

    /// Cancels the migrations whose VMs have a cancel request (`ferry migrate --cancel`),
    /// and only those; their names.
    public func cancelRequested() -> [String] {
        let running = monitor.withLock { migrations }
        var cancelled: [String] = []
        for (name, migration) in running {
            let request = store.vmPaths(name).cancelRequest
            guard FileManager.default.fileExists(atPath: request) else { continue }
            if migration.stop(.cancelled) == .accepted { cancelled.append(name) }
        }
        return cancelled.sorted()
    }

    private var snapshot: DrainProgress {
        DrainProgress(elapsedSeconds: (ContinuousClock.now - started).seconds, vms: states, stopping: stopping)
    }

    public func run() -> DrainReport {
        let startedAt = Date()
        let seconds = ContinuousClock.now
        monitor.lock()
        while true {
            if !stopping { startWhatMay() }
            let running = states.contains { $0.state == .running }
            let waiting = states.contains { $0.state == .waiting }
            if !running && (!waiting || stopping) { break }
            let now = snapshot
            monitor.unlock()
            progress(now)
            monitor.lock()
            _ = changed.wait(timeout: .milliseconds(500))
        }
        for i in states.indices where states[i].state == .waiting { states[i].state = .notStarted }
        let final = snapshot
        let entries = states.map { DrainReport.Entry(vm: $0.vm, destination: $0.destination, state: $0.state, report: reports[$0.vm]) }
        let wasStopped = stopping
        monitor.unlock()
        progress(final)
        return DrainReport(host: HostInfo.hostname, startedAt: startedAt, totalSeconds: (ContinuousClock.now - seconds).seconds,
                           plan: plan, entries: entries, stopped: wasStopped)
    }

    /// Starts the waiting migrations the limits allow, in the plan's order (lock held).
    private func startWhatMay() {
        for (i, placement) in plan.placements.enumerated() where states[i].state == .waiting {
            let running = states.filter { $0.state == .running }
            guard running.count < options.parallel else { return }
            guard running.filter({ $0.destination == placement.host }).count < options.perDestination else { continue }
            states[i].state = .running
            let migration = SourceMigration(store: store, name: placement.vm, options: options.migration(placement), logger: logger) {
                [weak self, options] p in
                self?.update(index: i, p)
                options.migrationProgress(placement.vm, p)
            }
            migrations[placement.vm] = migration
            options.started(placement.vm)
            logger.info("drain: migration started", metadata: ["vm": "\(placement.vm)", "to": "\(placement.destination)"])
            startThread("ferry-drain") { [self] in
                let report = migration.run()
                options.ended(report)
                monitor.withLock {
                    reports[placement.vm] = report
                    migrations[placement.vm] = nil
                    states[i].state = switch report.outcome {
                    case .succeeded: .succeeded
                    case .cancelled: .cancelled
                    case .uncertain: .uncertain
                    case .failedVMOnSource, .vmDied: .failed
                    }
                    states[i].phase = nil
                    states[i].bitsPerSecond = 0
                    if report.outcome == .succeeded { states[i].fraction = 1 }
                    changed.broadcast()
                }
            }
        }
    }

    private func update(index: Int, _ p: MigrationProgress) {
        monitor.withLock {
            guard states[index].state == .running else { return }
            states[index].phase = p.phase.rawValue
            states[index].bitsPerSecond = p.bitsPerSecond
            states[index].note = p.note
            if let q = p.qemu, q.transferredBytes + q.remainingBytes > 0 {
                states[index].fraction = min(1, Double(q.transferredBytes) / Double(q.transferredBytes + q.remainingBytes))
            }
        }
    }
}
