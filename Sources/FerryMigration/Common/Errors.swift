import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire

// One error type per operation, each case carrying its cause (the way Firecracker's
// `CreateSnapshotError` and `RestoreFromSnapshotError` do): `MigrateError` for a network
// migration at its source, `UpdateError` for a same-host update, `IncomingError` for a
// migration at its destination. Their `description` is the sentence the operator reads;
// what a failure means for the VM (the report's outcome) is decided from them in one
// place, ``MigrationOutcome``, and the CLI maps outcomes to exit statuses in one place
// (`ReportOptions.deliver`).

/// A VM that cannot be claimed for a migration or an update.
public enum ClaimError: Error, CustomStringConvertible, Sendable {
    /// The store has no such VM, or cannot lock it (``VMError``).
    case store(VMError)
    /// Its QEMU is gone.
    case notRunning(String)
    /// It is in another phase (migrating, updating, incoming).
    case busy(String, VMPhase)

    public var description: String {
        switch self {
        case .store(let e): return e.description
        case .notRunning(let name): return "VM '\(name)' is not running on this host (its QEMU is gone)"
        case .busy(let name, let phase): return "VM '\(name)' is \(phase.rawValue) on this host, not running"
        }
    }
}

/// What went wrong with the QEMU that holds the VM on this host (the source QEMU of a
/// migration, the old QEMU of an update).
public enum QEMUFailure: Error, CustomStringConvertible, Sendable {
    /// Its monitor cannot be reached.
    case unreachable(QMPError)
    /// A command failed; `doing` says what Ferry was doing, as a verb phrase.
    case command(doing: String, QMPError)
    /// It already has a migration under way.
    case busy(MigrationStatus)
    /// QEMU says its migration failed.
    case migrationFailed(reason: String?)
    /// QEMU says its migration was cancelled (not by Ferry).
    case migrationCancelled
    /// Its monitor went away mid-migration (QEMU exited or closed it).
    case lost(QMPError)

    public var description: String {
        switch self {
        case .unreachable(let e): return "cannot talk to the VM's QEMU: \(e)"
        case .command(let doing, let e): return "cannot \(doing): \(e)"
        case .busy(let status): return "QEMU already has a migration in progress (\(status))"
        case .migrationFailed(let reason): return "QEMU reports the migration failed: \(reason ?? "no reason given")"
        case .migrationCancelled: return "the migration was cancelled in QEMU"
        case .lost(let e): return "lost the VM's QEMU: \(e)"
        }
    }

    /// Follows QEMU's own account of its migration: throws if it failed or was cancelled.
    static func check(_ status: MigrationStatus, reason: String?) throws(QEMUFailure) {
        switch status {
        case .failed: throw .migrationFailed(reason: reason)
        case .cancelled, .cancelling: throw .migrationCancelled
        default: return
        }
    }
}

/// A failure talking to the peer daemon: what it said, or why it could not be heard.
public enum PeerFailure: Error, CustomStringConvertible, Sendable {
    /// The peer answered with an error frame.
    case said(ErrorMessage)
    case connection(SocketError)
    case wire(WireError)
    case security(SecurityError)
    case other(String)

    /// Sorts an error from the control connection (framing, sockets, handshake).
    init(_ error: any Error) {
        switch error {
        case let e as PeerFailure: self = e
        case let e as ErrorMessage: self = .said(e)
        case let e as SocketError: self = .connection(e)
        case let e as WireError: self = .wire(e)
        case let e as SecurityError: self = .security(e)
        default: self = .other("\(error)")
        }
    }

    public var description: String {
        switch self {
        case .said(let e): return e.description
        case .connection(let e): return e.description
        case .wire(let e): return e.description
        case .security(let e): return e.description
        case .other(let s): return s
        }
    }
}

/// Why a network migration failed at its source.
public enum MigrateError: Error, CustomStringConvertible, Sendable {
    case claim(ClaimError)
    case qemu(QEMUFailure)
    /// A record of this host's store could not be written.
    case store(doing: String, VMError)
    case unreachable(destination: String, SocketError)
    case handshake(destination: String, PeerFailure)
    case refused(PeerFailure)
    case destinationCannotStart(PeerFailure)
    /// The destination reported an error during the transfer.
    case destinationFailed(ErrorMessage)
    /// The destination broke the protocol (a frame out of place, a malformed message).
    case protocolViolation(String)
    case controlLost(String)
    case bootFile(String)
    case noChannels([String])
    case streamHandOff(String)
    case dataPath(TransportError)
    /// A disk could not be proved shared, or its copy failed or could not be set up.
    case disks(String)
    /// The VM's NICs cannot go to the destination (a peer too old to carry them).
    case nics(String)
    /// `--converge postcopy` cannot be had (a peer too old, disks being copied).
    case postcopy(String)
    /// libvirt refused or failed the migration, or cannot be reached (its message passed through).
    case libvirt(String)
    /// `--cancel`, Ctrl-C, SIGTERM or `--timeout`, granted before the commit point.
    case stopped(StopRequest)
    case illegal(IllegalTransition)
    // After the source recorded its commit: never rolled back, settled with the destination.
    case commitNotRecorded(VMError)
    /// The destination refused to run the VM after the commit (it discarded its copy).
    case destinationCannotRun(ErrorMessage)
    /// The commit's fate is unknown: sent or not, no answer came.
    case commitUnconfirmed(String)

    public var description: String {
        switch self {
        case .claim(let e): return e.description
        case .qemu(let e): return e.description
        case .store(let doing, let e): return "cannot \(doing): \(e)"
        case .unreachable(let d, let e): return "cannot reach ferry serve at \(d): \(e)"
        case .handshake(let d, let e): return "handshake with \(d) failed: \(e)"
        case .refused(let e): return "the destination refused the VM: \(e)"
        case .destinationCannotStart(let e): return "the destination could not start QEMU: \(e)"
        case .destinationFailed(let e): return "destination: \(e)"
        case .protocolViolation(let s): return s
        case .controlLost(let why): return "lost the control connection to the destination: \(why)"
        case .bootFile(let s): return s
        case .noChannels(let errors): return "no data channel could be opened: \(errors.joined(separator: "; "))"
        case .streamHandOff(let s): return s
        case .dataPath(let e): return "data path: \(e)"
        case .disks(let s), .nics(let s), .postcopy(let s), .libvirt(let s): return s
        case .stopped(let stop): return stop.message
        case .illegal(let e): return e.description
        case .commitNotRecorded(let e): return "cannot record the commit decision: \(e)"
        case .destinationCannotRun(let e): return "the destination could not start the VM: \(e)"
        case .commitUnconfirmed(let why): return why
        }
    }
}

/// Why a same-host update failed.
public enum UpdateError: Error, CustomStringConvertible, Sendable {
    case claim(ClaimError)
    /// The VM's RAM is not in the shared file a new QEMU could map.
    case memoryNotShared(name: String, file: String)
    case oldQEMU(QEMUFailure)
    case store(doing: String, VMError)
    case newQEMUDidNotStart(String)
    case newQEMU(doing: String, QMPError)
    case newQEMUExited(pid: Int32)
    case newQEMUCannotLoad(reason: String?)
    /// The new QEMU runs the guest before Ferry's `cont`: it must not be trusted with it.
    case newQEMURanEarly(QEMURunStatus)
    /// The old QEMU is not in `postmigrate` after its migration completed.
    case oldQEMUNotDone(QEMURunStatus)
    case timedOut(seconds: Int, waitingFor: String?)
    case illegal(IllegalTransition)

    public var description: String {
        switch self {
        case .claim(let e): return e.description
        case .memoryNotShared(let name, let file):
            return "VM '\(name)' does not keep its RAM in \(file) (it was started before Ferry "
                + "used a shared memory backend, or the file was removed), so a new QEMU could not take its memory over; "
                + "migrate it to another host, or stop it and run it again"
        case .oldQEMU(let e): return e.description
        case .store(let doing, let e): return "cannot \(doing): \(e)"
        case .newQEMUDidNotStart(let why): return "the new QEMU did not start: \(why)"
        case .newQEMU(let doing, let e): return "cannot \(doing): \(e)"
        case .newQEMUExited(let pid): return "the new QEMU (pid \(pid)) exited"
        case .newQEMUCannotLoad(let reason): return "the new QEMU could not load the VM: \(reason ?? "no reason given")"
        case .newQEMURanEarly(let status): return "the new QEMU started the VM on its own (\(status))"
        case .oldQEMUNotDone(let status): return "the old QEMU is \(status) after the migration, not postmigrate"
        case .timedOut(let seconds, let what):
            return what.map { "\($0) did not happen within \(seconds) s (--timeout)" } ?? "timed out after \(seconds) s"
        case .illegal(let e): return e.description
        }
    }
}

/// Why a migration failed at its destination. What the source is told (an ``ErrorMessage``
/// with its ``ErrorCode``) is decided here, in ``frame``.
public enum IncomingError: Error, CustomStringConvertible, Sendable {
    /// The offer is refused (bad spec, a VM of that name here, this host cannot run it).
    case refused(ErrorCode, String)
    /// The source gave up, failed, or went away.
    case sourceGone(String)
    case protocolViolation(String)
    case bootFile(String)
    /// The destination QEMU could not start, load or run the VM.
    case qemu(String)
    case record(String)
    /// Talking to the source failed (its frames, its socket).
    case peer(PeerFailure)
    case dataPath(TransportError)

    public var description: String { frame.message }

    /// The error frame sent to the source.
    public var frame: ErrorMessage {
        switch self {
        case .refused(let code, let s): return ErrorMessage(code: code, message: s)
        case .sourceGone(let s): return ErrorMessage(code: .aborted, message: s)
        case .protocolViolation(let s): return ErrorMessage(code: .protocolViolation, message: s)
        case .bootFile(let s): return ErrorMessage(code: .fileMismatch, message: s)
        case .qemu(let s): return ErrorMessage(code: .qemuFailed, message: s)
        case .record(let s): return ErrorMessage(code: .internalError, message: s)
        case .peer(.said(let e)): return e
        case .peer(.wire(let e)): return ErrorMessage(code: .protocolViolation, message: e.description)
        case .peer(.connection(let e)): return ErrorMessage(code: .aborted, message: "connection to the source: \(e)")
        case .peer(let e): return ErrorMessage(code: .internalError, message: e.description)
        case .dataPath(.aborted(let why)): return ErrorMessage(code: .qemuFailed, message: "data path: \(why)")
        case .dataPath(let e): return ErrorMessage(code: .protocolViolation, message: "data path: \(e)")
        }
    }
}

/// The one place a failure becomes the report's outcome.
public enum MigrationOutcome {
    /// What a source learned while rolling back a failure before its commit point.
    public struct Rollback: Sendable, Equatable {
        /// The VM runs on the source again (or is paused as it was before).
        public var vmSafe: Bool
        /// The source QEMU is gone (it died, or was killed).
        public var qemuDied: Bool
        public init(vmSafe: Bool, qemuDied: Bool) {
            self.vmSafe = vmSafe
            self.qemuDied = qemuDied
        }
    }

    /// A network migration that failed before its commit point and was rolled back.
    public static func of(_ error: MigrateError, _ rollback: Rollback) -> MigrationReport.Outcome {
        if rollback.qemuDied { return .vmDied }
        if !rollback.vmSafe { return .uncertain }
        if case .stopped(.cancelled) = error { return .cancelled }
        return .failedVMOnSource
    }

    /// A same-host update that failed and was rolled back.
    public static func of(_ error: UpdateError, vmSafe: Bool) -> MigrationReport.Outcome {
        vmSafe ? .failedVMOnSource : .uncertain
    }

    /// Whether a network migration's failure happened past its commit point: then nothing
    /// rolls back and the outcome is settled with the destination.
    public static func isPastCommit(_ error: MigrateError, commitRecorded: Bool) -> Bool {
        switch error {
        case .commitUnconfirmed, .destinationCannotRun: return true
        default: return commitRecorded
        }
    }
}
