import Foundation

/// What `query-migrate` reports, typed.
public struct MigrationInfo: Sendable, Equatable {
    /// none, setup, active, pre-switchover, device, completed, failed, cancelling, cancelled, ...
    public var status: String
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

    public init(status: String) { self.status = status }

    public init(_ value: JSONValue) {
        status = value["status"]?.string ?? "none"
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
    }

    public var isFinished: Bool { ["completed", "failed", "cancelled"].contains(status) }
    /// Bytes per second the guest dirties.
    public var dirtyBytesPerSecond: UInt64 { dirtyPagesRate * pageSize }
}

/// What `query-status` reports.
public struct RunState: Sendable, Equatable {
    public var status: String
    public var running: Bool
}

extension QMPClient {
    public func queryMigrate() throws(QMPError) -> MigrationInfo {
        MigrationInfo(try execute("query-migrate"))
    }

    /// QEMU's migration states after which it has left the migration.
    public static let migrationEndStates: Set<String> = ["failed", "cancelled", "completed", "none"]

    /// Cancels QEMU's outgoing migration (`migrate_cancel`) and waits, up to `timeout`, until
    /// QEMU has left it (a paused VM can only be resumed after that). Best effort: errors
    /// end the wait, they are not thrown.
    public func cancelMigration(timeout: Duration) {
        _ = try? execute("migrate_cancel")
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            guard let info = try? queryMigrate(), !Self.migrationEndStates.contains(info.status) else { return }
            usleep(20_000)
        }
    }

    public func queryStatus() throws(QMPError) -> RunState {
        let v = try execute("query-status")
        return RunState(status: v["status"]?.string ?? "unknown", running: v["running"]?.bool ?? false)
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
