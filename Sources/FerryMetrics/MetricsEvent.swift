import Foundation

/// Which side of a migration a process ran: `ferry migrate` is the source, the daemon the
/// destination of every incoming one, a same-host update (`ferry vm update`) both at once.
public enum MigrationRole: String, Codable, Sendable, CaseIterable {
    case source
    case destination
    case update
}

/// Which way bytes crossed a NIC.
public enum NICDirection: String, Codable, Sendable, CaseIterable {
    case sent
    case received
}

/// How a migration ended, as plain values (no dependency on FerryMigration: the `ferry`
/// target turns a `MigrationReport` into one). Optional figures are left out of the
/// histograms and gauges when nil.
public struct MigrationEnd: Sendable, Equatable {
    /// The report's outcome string: succeeded, failed-vm-on-source, uncertain,
    /// failed-vm-died, cancelled (anything else is counted as "other").
    public var outcome: String
    public var totalSeconds: Double
    public var throughputBitsPerSecond: Double?
    public var downtimeMilliseconds: Double?
    /// Bytes per NIC and direction over the whole migration (cumulative: the reporter
    /// subtracts what its progress calls already reported).
    public var nicBytes: [NICBytes]
    public var channelsFailedOver: Int
    /// Stream bytes over wire bytes (above 1: compression paid), nil if not known.
    public var compressionRatio: Double?

    public init(outcome: String, totalSeconds: Double, throughputBitsPerSecond: Double? = nil, downtimeMilliseconds: Double? = nil,
                nicBytes: [NICBytes] = [], channelsFailedOver: Int = 0, compressionRatio: Double? = nil) {
        self.outcome = outcome
        self.totalSeconds = totalSeconds
        self.throughputBitsPerSecond = throughputBitsPerSecond
        self.downtimeMilliseconds = downtimeMilliseconds
        self.nicBytes = nicBytes
        self.channelsFailedOver = channelsFailedOver
        self.compressionRatio = compressionRatio
    }
}

/// Bytes one NIC moved in one direction.
public struct NICBytes: Codable, Sendable, Equatable {
    public var nic: String
    public var direction: NICDirection
    public var bytes: UInt64

    public init(nic: String, direction: NICDirection, bytes: UInt64) {
        self.nic = nic
        self.direction = direction
        self.bytes = bytes
    }
}

/// One datagram from a process to the daemon (`<run>/metrics.sock`): JSON, one event per
/// datagram, NIC bytes as deltas since the last event of that migration. Version 1.
public struct MetricsEvent: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        case started
        /// NIC byte deltas while the migration runs, so the counters move before its end.
        case bytes
        case ended
    }

    public static let version = 1
    /// The largest datagram the daemon reads; a larger one is dropped whole. An ended
    /// event with 16 NICs in both directions is under 2 KiB.
    public static let maximumByteCount = 16 * 1024

    public var v = MetricsEvent.version
    public var kind: Kind
    public var vm: String
    public var role: MigrationRole
    public var nics: [NICBytes]? = nil
    public var outcome: String? = nil
    public var seconds: Double? = nil
    public var throughputBitsPerSecond: Double? = nil
    public var downtimeMilliseconds: Double? = nil
    public var channelsFailedOver: Int? = nil
    public var compressionRatio: Double? = nil

    public init(kind: Kind, vm: String, role: MigrationRole) {
        self.kind = kind
        self.vm = vm
        self.role = role
    }

    /// The ended event for `end`, with `nics` as the deltas to report.
    public init(vm: String, role: MigrationRole, end: MigrationEnd, nicDeltas: [NICBytes]) {
        self.init(kind: .ended, vm: vm, role: role)
        nics = nicDeltas
        outcome = end.outcome
        seconds = end.totalSeconds
        throughputBitsPerSecond = end.throughputBitsPerSecond
        downtimeMilliseconds = end.downtimeMilliseconds
        channelsFailedOver = end.channelsFailedOver
        compressionRatio = end.compressionRatio
    }

    public var encoded: [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array((try? encoder.encode(self)) ?? Data())
    }

    /// The event in a datagram, nil if it is not one (wrong version, malformed, too large).
    public static func decode(_ bytes: some Collection<UInt8>) -> MetricsEvent? {
        guard bytes.count <= maximumByteCount, let event = try? JSONDecoder().decode(MetricsEvent.self, from: Data(bytes)),
              event.v == version else { return nil }
        return event
    }
}
