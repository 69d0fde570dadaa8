import Foundation

/// Places in the switchover where the chaos tests hold a migration still for a moment, so
/// that a fault (a kill, a NIC going down) lands exactly there. Set by the environment
/// variable `FERRY_FAULT_PAUSE=point:seconds[,point:seconds]`; unset (always, outside the
/// tests) they cost one dictionary lookup per switchover.
public enum FaultPoint: String, CaseIterable, Sendable {
    /// Source: channels open and the destination QEMU waits; QEMU's `migrate` not issued.
    case sourceSetup = "source-setup"
    /// Source: the destination said `loaded`; the commit is not decided yet.
    case sourceBeforeCommit = "source-before-commit"
    /// Source: the commit is on disk, not yet sent (the in-doubt window).
    case sourceAfterCommitRecord = "source-after-commit-record"
    /// Source: the destination confirmed it runs the VM; the source QEMU still exists.
    case sourceAfterCommitted = "source-after-committed"
    /// Destination: `prepared` is on disk, `loaded` not yet sent.
    case destinationAfterPrepared = "destination-after-prepared"
    /// Same-host update: the new QEMU holds the VM, paused; the old one sits in
    /// `postmigrate`; `cont` not yet given.
    case updateBeforeCont = "update-before-cont"
    /// Same-host update: the VM runs in the new QEMU; the old one has not quit yet.
    case updateAfterCont = "update-after-cont"

    static let pauses: [FaultPoint: Double] = {
        guard let text = ProcessInfo.processInfo.environment["FERRY_FAULT_PAUSE"] else { return [:] }
        var out: [FaultPoint: Double] = [:]
        for item in text.split(separator: ",") {
            let parts = item.split(separator: ":")
            if parts.count == 2, let point = FaultPoint(rawValue: String(parts[0])), let seconds = Double(parts[1]) {
                out[point] = seconds
            }
        }
        return out
    }()

    /// Pauses here if the environment asks for it, after appending the point's name to the
    /// file `FERRY_FAULT_MARK` names (if any), which the tests watch for.
    func pause() {
        guard let seconds = Self.pauses[self] else { return }
        FileHandle.standardError.write(Data("ferry: fault point \(rawValue): pausing \(seconds) s\n".utf8))
        if let mark = ProcessInfo.processInfo.environment["FERRY_FAULT_MARK"] {
            let fd = open(mark, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            if fd >= 0 {
                _ = "\(rawValue)\n".withCString { write(fd, $0, strlen($0)) }
                close(fd)
            }
        }
        Thread.sleep(forTimeInterval: seconds)
    }
}
