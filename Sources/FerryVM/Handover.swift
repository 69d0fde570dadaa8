#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// What one host has durably decided about a migration's switchover: the record that lets
/// the survivors of a crash agree on which copy of the VM runs.
///
/// The source is the coordinator. The destination writes `prepared` once its QEMU holds
/// the whole VM (paused, `-S`) and before it says `loaded`; the source writes `commit`
/// before it sends `commit`; the destination writes `committed` before it runs `cont`.
/// Each is on disk (fsync of file and directory) before the message that depends on it
/// leaves, so after a crash of any one party the records say what was decided:
/// docs/PROTOCOL.md ("Switchover and crashes") walks through every crash point.
public struct HandoverRecord: Codable, Sendable, Equatable {
    public enum Role: String, Codable, Sendable {
        case source, destination
    }

    public enum Decision: String, Codable, Sendable {
        /// Destination: the VM is loaded and paused; only the source's decision may run it.
        case prepared
        /// Source: the VM goes to the destination; the source copy never runs again.
        case commit
        /// Destination: told to commit; the VM runs (or is about to run) here.
        case committed
    }

    public var session: String
    public var role: Role
    public var decision: Decision
    /// The peer's daemon, to settle the outcome with after a crash.
    public var peerHost: String
    public var peerPort: UInt16
    public var at: Date
    /// A commit into postcopy: the VM runs at the destination while pages still come from
    /// the source QEMU, so both halves are needed until the migration completes. The source
    /// QEMU must neither run again nor be stopped until then.
    public var postcopy: Bool?

    public init(session: String, role: Role, decision: Decision, peerHost: String, peerPort: UInt16, at: Date = Date(),
                postcopy: Bool = false) {
        self.postcopy = postcopy ? true : nil
        self.session = session
        self.role = role
        self.decision = decision
        self.peerHost = peerHost
        self.peerPort = peerPort
        self.at = at
    }
}

extension VMStore {
    /// The VM's handover record, if a switchover is under way or unsettled.
    public func handover(_ name: String) -> HandoverRecord? {
        try? readHandover(name)
    }

    /// Writes the handover record durably: a temporary file, fsync, rename, fsync of the
    /// directory. Returns only once a crash (of the process or the host) cannot lose it.
    public func recordHandover(_ name: String, _ record: HandoverRecord) throws {
        try write(record, to: vmPaths(name).handover, durably: true)
    }

    /// The same, putting `staged` (written ahead, ``stageHandover(_:_:)``) in place when
    /// there is one: then only its rename and the directory's fsync are left. A staged
    /// copy that cannot be put in place is discarded and `record` written whole.
    public func recordHandover(_ name: String, _ record: HandoverRecord, staged: StagedHandover?) throws {
        if let staged {
            do {
                return try staged.install()
            } catch {
                staged.discard()
            }
        }
        try recordHandover(name, record)
    }

    /// The VM's handover record: nil if it has none; throws if one exists and cannot be
    /// read (it may say `commit`: a reconciler then decides nothing).
    public func readHandover(_ name: String) throws -> HandoverRecord? {
        switch loadHandover(name) {
        case .absent: return nil
        case .valid(let record): return record
        case .damaged(let damage): throw VMError.io("cannot read \(damage.path): it \(damage.problem)")
        }
    }

    /// The VM's handover record as read: absent, damaged (and why) or valid.
    public func loadHandover(_ name: String) -> StateFileRead<HandoverRecord> {
        StateFileCoding.load(.handover, at: vmPaths(name).handover, StateFileCoding.decodeHandover)
    }

    /// Removes the handover record once the outcome is settled (durably too).
    public func clearHandover(_ name: String) {
        try? removeHandover(name)
    }

    /// Removes the handover record durably; one already gone is fine.
    public func removeHandover(_ name: String) throws {
        let path = vmPaths(name).handover
        guard unlink(path) == 0 else {
            if errno == ENOENT { return }
            throw VMError.io("cannot remove \(path): \(String(cString: strerror(errno)))")
        }
        Self.syncDirectory(of: path)
    }

    /// Writes the handover record's file durably under a name of its own, without putting
    /// it in place: the half of ``recordHandover(_:_:)`` that can be done ahead of the
    /// switchover step that needs it. ``StagedHandover/install()`` is then a rename and a
    /// directory fsync. A staged file is never read; a crash leaves it harmless.
    public func stageHandover(_ name: String, _ record: HandoverRecord) throws -> StagedHandover {
        let path = vmPaths(name).handover
        let staged = path + ".staged-\(record.decision.rawValue)"
        try Self.writeFileDurably(try StateFileCoding.encode(record), to: staged)
        return StagedHandover(staged: staged, path: path)
    }

    static func writeDurably(_ data: Data, to path: String) throws {
        let tmp = path + ".tmp"
        try writeFileDurably(data, to: tmp)
        guard rename(tmp, path) == 0 else {
            unlink(tmp)
            throw VMError.io("cannot write \(path) durably: \(String(cString: strerror(errno)))")
        }
        syncDirectory(of: path)
    }

    /// Writes `data` to `tmp` and fsyncs it (not its directory).
    static func writeFileDurably(_ data: Data, to tmp: String) throws {
        let fd = open(tmp, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw VMError.io("cannot write \(tmp): \(String(cString: strerror(errno)))") }
        var ok = data.withUnsafeBytes { raw -> Bool in
            var done = 0
            while done < raw.count {
                let n = Glibc.write(fd, raw.baseAddress! + done, raw.count - done)
                if n < 0 { if errno == EINTR { continue }; return false }
                done += n
            }
            return true
        }
        ok = ok && fsync(fd) == 0
        close(fd)
        guard ok else {
            unlink(tmp)
            throw VMError.io("cannot write \(tmp) durably: \(String(cString: strerror(errno)))")
        }
    }

    static func syncDirectory(of path: String) {
        let dir = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dir >= 0 else { return }
        fsync(dir)
        close(dir)
    }
}

extension VMLock {
    /// True if a live process (a `ferry migrate` or update) holds the VM's lock.
    public static func isHeld(paths: VMPaths) -> Bool {
        let fd = open(paths.lock, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        if flock(fd, LOCK_EX | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            return false
        }
        return true
    }
}

/// A handover record written and synced beside its place (``VMStore/stageHandover(_:_:)``).
public struct StagedHandover: Sendable {
    let staged: String
    let path: String

    /// Puts the record in place, durably: a rename, then an fsync of the directory.
    public func install() throws {
        guard rename(staged, path) == 0 else {
            throw VMError.io("cannot put \(path) in place: \(String(cString: strerror(errno)))")
        }
        VMStore.syncDirectory(of: path)
    }

    /// Removes the staged file (the step it was for did not come).
    public func discard() { unlink(staged) }
}
