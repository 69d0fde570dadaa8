/// Phases of a migration as the operator sees them (progress, report, `--json`). The raw
/// values are part of the report's format.
public enum MigrationPhase: String, Codable, Sendable, CaseIterable {
    case preparing
    /// Waiting in line: for one of this host's outgoing slots, or at the destination.
    case queued
    case connecting
    case negotiating
    case sendingBootFiles = "sending-boot-files"
    case startingDestination = "starting-destination"
    case openingChannels = "opening-channels"
    case copyingDisks = "copying-disks"
    case transferring
    case switchover
    case committing
    /// Committed into postcopy: the VM runs at the destination while the source QEMU sends
    /// the pages it has not yet; both halves are needed until it completes.
    case postcopy
    case done
}

/// Which phase may follow which, for one kind of migration. A migration that fails stays
/// in the phase it failed in (the report's `failedPhase`); only a success reaches `done`.
public struct PhaseGraph<Phase: Hashable & Sendable & RawRepresentable<String>>: Sendable {
    let next: [Phase: Set<Phase>]

    /// A network migration, at its source. Queueing happens twice: for one of this host's
    /// outgoing slots (before `preparing` ends) and at the destination (while it is being
    /// asked to start QEMU). The destination may answer `loaded` before QEMU's STOP event
    /// is seen, so `committing` may follow `transferring` directly.
    public func allows(_ from: Phase, _ to: Phase) -> Bool {
        next[from]?.contains(to) ?? false
    }
}

extension PhaseGraph where Phase == MigrationPhase {
    public static var networkSource: PhaseGraph { PhaseGraph(next: [
        .preparing: [.queued, .connecting],
        .queued: [.preparing, .startingDestination],
        .connecting: [.negotiating],
        // A resume of postcopy that failed on the way tries again from the connection.
        .negotiating: [.sendingBootFiles, .startingDestination, .connecting],
        .sendingBootFiles: [.startingDestination],
        .startingDestination: [.queued, .openingChannels, .connecting],
        .openingChannels: [.copyingDisks, .transferring, .postcopy, .connecting],
        .copyingDisks: [.transferring],
        .transferring: [.switchover, .committing],
        .switchover: [.committing],
        .committing: [.postcopy, .done],
        // A postcopy whose session was lost goes on in a new one (``SourceMigration/resumePostcopy``).
        .postcopy: [.done, .connecting],
    ]) }

    /// A same-host update: a new QEMU, device state only, then `cont` in the new one.
    public static var sameHostUpdate: PhaseGraph { PhaseGraph(next: [
        .preparing: [.startingDestination],
        .startingDestination: [.transferring],
        .transferring: [.switchover],
        .switchover: [.committing],
        .committing: [.done],
    ]) }
}

/// An illegal phase change: a bug in the orchestration, never the peer's doing. The
/// migration fails where it stands (before the commit point that rolls it back).
public struct IllegalTransition: Error, CustomStringConvertible, Sendable, Equatable {
    public var from: String
    public var to: String
    public var description: String { "internal error: a migration cannot go from \(from) to \(to)" }
}

/// The phase of one migration and the one place it changes: ``move(to:)`` checks the
/// change against the migration's ``PhaseGraph`` before making it (compare, then change,
/// as QEMU's `migrate_set_state` does); its caller, ``MigrationRun/move(to:)``, then tells
/// the progress display.
struct PhaseMachine<Phase: Hashable & Sendable & RawRepresentable<String>>: Sendable {
    let graph: PhaseGraph<Phase>
    private(set) var current: Phase

    init(_ graph: PhaseGraph<Phase>, start: Phase) {
        self.graph = graph
        current = start
    }

    /// Moves to `next`; false if the migration is there already (a repeated event is not
    /// a change). Throws ``IllegalTransition`` for a change the graph does not allow.
    mutating func move(to next: Phase) throws(IllegalTransition) -> Bool {
        guard next != current else { return false }
        guard graph.allows(current, next) else { throw IllegalTransition(from: current.rawValue, to: next.rawValue) }
        current = next
        return true
    }
}
