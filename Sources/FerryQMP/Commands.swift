import Foundation

/// An enum of QEMU's QAPI schema, kept by QEMU's name for each value, with a case for a
/// name this Ferry does not know (a newer QEMU's), so that nothing QEMU says is lost.
public protocol QAPIEnum: Sendable, Hashable, CustomStringConvertible {
    /// Each known value with QEMU's name for it.
    static var qapiNames: [(Self, String)] { get }
    /// A value QEMU names `name` that this Ferry does not know.
    static func other(_ name: String) -> Self
    /// The name of an ``other(_:)`` value; nil for a known one.
    var unknownName: String? { get }
}

extension QAPIEnum {
    /// The value QEMU names `name`.
    public init(qemuName name: String) {
        self = Self.qapiNames.first { $0.1 == name }?.0 ?? .other(name)
    }

    /// QEMU's name for the value.
    public var qemuName: String {
        unknownName ?? Self.qapiNames.first { $0.0 == self }!.1
    }

    public var description: String { qemuName }
}

/// QEMU's migration state (`MigrationStatus` in QEMU's qapi/migration.json), as
/// `query-migrate` and the `MIGRATION` event report it. A state this QEMU names that Ferry
/// does not know is kept as ``other(_:)`` and counts as under way: Ferry never starts a
/// second migration over one it cannot name.
public enum MigrationStatus: QAPIEnum {
    case none
    case setup
    case cancelling
    case cancelled
    case active
    case postcopyActive
    case postcopyPaused
    case postcopyRecover
    case completed
    case failed
    case colo
    case preSwitchover
    case device
    case waitUnplug
    case other(String)

    public static let qapiNames: [(MigrationStatus, String)] = [
        (.none, "none"), (.setup, "setup"), (.cancelling, "cancelling"), (.cancelled, "cancelled"),
        (.active, "active"), (.postcopyActive, "postcopy-active"), (.postcopyPaused, "postcopy-paused"),
        (.postcopyRecover, "postcopy-recover"), (.completed, "completed"), (.failed, "failed"), (.colo, "colo"),
        (.preSwitchover, "pre-switchover"), (.device, "device"), (.waitUnplug, "wait-unplug"),
    ]

    public var unknownName: String? {
        if case .other(let name) = self { return name }
        return nil
    }

    /// QEMU has left the migration (or never had one): a new one may start, and a VM the
    /// migration paused may be resumed.
    public var hasEnded: Bool { [.none, .completed, .failed, .cancelled].contains(self) }

    /// The migration reached an end of its own (not `none`: there was one).
    public var isFinished: Bool { [.completed, .failed, .cancelled].contains(self) }

    /// A migration is under way (or being cancelled): no second one may start.
    public var isInProgress: Bool { !hasEnded }
}

/// QEMU's run state (`RunState` in qapi/run-state.json), as `query-status` reports it.
public enum QEMURunStatus: QAPIEnum {
    case running
    case paused
    case prelaunch
    case inmigrate
    /// The source has stopped the guest for the migration's last pass.
    case finishMigrate
    /// The source has sent everything: its guest must never run again unless the
    /// migration is rolled back.
    case postmigrate
    case shutdown
    case suspended
    case guestPanicked
    case internalError
    case ioError
    case other(String)

    public static let qapiNames: [(QEMURunStatus, String)] = [
        (.running, "running"), (.paused, "paused"), (.prelaunch, "prelaunch"), (.inmigrate, "inmigrate"),
        (.finishMigrate, "finish-migrate"), (.postmigrate, "postmigrate"), (.shutdown, "shutdown"),
        (.suspended, "suspended"), (.guestPanicked, "guest-panicked"), (.internalError, "internal-error"),
        (.ioError, "io-error"),
    ]

    public var unknownName: String? {
        if case .other(let name) = self { return name }
        return nil
    }

    /// Paused by a migration on this side (stop-and-copy or after it).
    public var isPausedByMigration: Bool { [.finishMigrate, .postmigrate].contains(self) }
}

/// What `query-migrate` reports, typed.
public struct MigrationInfo: Sendable, Equatable {
    public var status: MigrationStatus
    public var transferredBytes: UInt64 = 0
    public var remainingBytes: UInt64 = 0
    public var totalBytes: UInt64 = 0
    public var zeroPages: UInt64 = 0
    public var normalPages: UInt64 = 0
    public var dirtyPagesRate: UInt64 = 0
    public var pageSize: UInt64 = 4096
    public var dirtySyncCount: UInt64 = 0
    public var megabitsPerSecond: Double = 0
    public var expectedDowntimeMilliseconds: Double?
    public var downtimeMilliseconds: Double?
    public var totalTimeMilliseconds: Double?
    public var setupTimeMilliseconds: Double?
    public var errorDescription: String?
    /// The vCPU throttle auto-converge has applied, percent (0: none).
    public var cpuThrottlePercentage: Int = 0
    /// A postcopy destination's `postcopy-blocktime` (capability of that name): how long
    /// vCPUs waited on missing pages, in total, milliseconds.
    public var postcopyBlocktimeMilliseconds: Double?

    public init(status: MigrationStatus) { self.status = status }

    public init(_ value: JSONValue) {
        status = MigrationStatus(qemuName: value["status"]?.string ?? "none")
        if let ram = value["ram"] {
            transferredBytes = ram["transferred"]?.uint64 ?? 0
            remainingBytes = ram["remaining"]?.uint64 ?? 0
            totalBytes = ram["total"]?.uint64 ?? 0
            zeroPages = ram["duplicate"]?.uint64 ?? 0
            normalPages = ram["normal"]?.uint64 ?? 0
            dirtyPagesRate = ram["dirty-pages-rate"]?.uint64 ?? 0
            pageSize = ram["page-size"]?.uint64 ?? 4096
            dirtySyncCount = ram["dirty-sync-count"]?.uint64 ?? 0
            megabitsPerSecond = ram["mbps"]?.double ?? 0
        }
        expectedDowntimeMilliseconds = value["expected-downtime"]?.double
        downtimeMilliseconds = value["downtime"]?.double
        totalTimeMilliseconds = value["total-time"]?.double
        setupTimeMilliseconds = value["setup-time"]?.double
        errorDescription = value["error-desc"]?.string
        cpuThrottlePercentage = value["cpu-throttle-percentage"]?.uint64.map { Int($0) } ?? 0
        postcopyBlocktimeMilliseconds = value["postcopy-blocktime"]?.double
    }

    /// Bytes per second the guest dirties.
    public var dirtyBytesPerSecond: UInt64 { dirtyPagesRate * pageSize }
}

/// What ``QMPClient/takeBack(cancel:timeout:resume:)`` did.
public struct TakeBack: Sendable {
    /// QEMU had a migration under way and it was cancelled.
    public var cancelled = false
    /// The guest was paused and has been resumed.
    public var resumed = false
    /// The run state before any resume (nil if QEMU could not be asked).
    public var stateBefore: QEMURunStatus?
    /// Asking QEMU or resuming failed: the guest may still be paused.
    public var resumeError: QMPError?
    public init() {}
}

/// What `query-status` reports.
public struct RunState: Sendable, Equatable {
    public var status: QEMURunStatus
    public var running: Bool
    public init(status: QEMURunStatus, running: Bool) {
        self.status = status
        self.running = running
    }
}

extension QMPClient {
    public func queryMigrate(timeout: Duration = .seconds(10)) throws(QMPError) -> MigrationInfo {
        MigrationInfo(try execute("query-migrate", timeout: timeout))
    }

    /// Cancels QEMU's outgoing migration (`migrate_cancel`) and waits, up to `timeout`, until
    /// QEMU has left it (a paused VM can only be resumed after that). Best effort: errors
    /// end the wait, they are not thrown.
    public func cancelMigration(timeout: Duration) {
        _ = try? execute("migrate_cancel")
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            guard let info = try? queryMigrate(), !info.status.hasEnded else { return }
            usleep(20_000)
        }
    }

    /// Takes a source QEMU back from an outgoing migration, the one rollback of every
    /// kind of migration: QEMU's migration is cancelled if `cancel` says so and one is
    /// under way (waiting, up to `timeout`, until QEMU has left it: a VM paused by a
    /// migration can only be resumed after that), then the guest is resumed if it is not
    /// running and `resume` says so of its state. Never throws: what was done is returned.
    public func takeBack(cancel: Bool = true, timeout: Duration = .seconds(15),
                         resume: (RunState) -> Bool) -> TakeBack {
        var done = TakeBack()
        if cancel, let info = try? queryMigrate(), !info.status.hasEnded {
            cancelMigration(timeout: timeout)
            done.cancelled = true
        }
        do {
            let state = try queryStatus()
            done.stateBefore = state.status
            if !state.running && resume(state) {
                try execute("cont")
                done.resumed = true
            }
        } catch {
            done.resumeError = error
        }
        return done
    }

    public func queryStatus() throws(QMPError) -> RunState {
        let v = try execute("query-status")
        return RunState(status: QEMURunStatus(qemuName: v["status"]?.string ?? "unknown"), running: v["running"]?.bool ?? false)
    }

    public func setMigrationCapabilities(_ capabilities: [(String, Bool)]) throws(QMPError) {
        let list = capabilities.map { JSONValue.object(["capability": .string($0.0), "state": .bool($0.1)]) }
        try execute("migrate-set-capabilities", arguments: ["capabilities": .array(list)])
    }

    public func setMigrationParameters(_ parameters: [String: JSONValue]) throws(QMPError) {
        try execute("migrate-set-parameters", arguments: .object(parameters))
    }

    /// Asks QEMU to quit (the VM is gone afterwards).
    public func quit() throws(QMPError) {
        do {
            try execute("quit", timeout: .seconds(5))
        } catch let error where error.kind == .closed {
            // QEMU may close the socket before its reply is read; that is success here.
        }
    }
}
