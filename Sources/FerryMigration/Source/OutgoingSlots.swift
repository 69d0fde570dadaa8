import FerryIO
import Foundation

/// The limit on outgoing migrations of one host. Each `ferry migrate` is its own process,
/// so the limit lives in the file system: `limit` slot files in the host's run directory,
/// each held with flock(2) by the migration using it (the kernel drops the lock when the
/// process ends, however it ends, so a crashed migration never keeps a slot). Migrations
/// that find every slot held wait in line: each registers a file named by its arrival time
/// and pid in `outgoing-queue/`, and only the first in line tries the slots, so they go in
/// the order they came.
///
/// A held slot belongs to the migration that took it and is released when dropped; it is
/// immutable (its number and descriptor), so any thread may hold the reference.
public final class OutgoingSlot: Sendable {
    /// `FERRY_MAX_OUTGOING_MIGRATIONS`, default 2 (as for incoming ones, and Hyper-V's
    /// default of 2 simultaneous live migrations per host).
    public static var limitFromEnvironment: Int {
        ProcessInfo.processInfo.environment["FERRY_MAX_OUTGOING_MIGRATIONS"].flatMap { Int($0) }.map { max(1, $0) } ?? 2
    }

    public struct Holder: Sendable {
        public var slot: Int
        public var pid: Int32
        public var vm: String
    }

    public struct Waiter: Sendable {
        public var pid: Int32
        public var vm: String
        public var since: Date
    }

    public let slot: Int
    private let fd: Int32

    private init(slot: Int, fd: Int32) {
        self.slot = slot
        self.fd = fd
    }

    deinit {
        ftruncate(fd, 0)
        flock(fd, LOCK_UN)
        close(fd)
    }

    static func slotPath(_ runDirectory: String, _ i: Int) -> String { runDirectory + "/outgoing-\(i).slot" }
    static func queueDirectory(_ runDirectory: String) -> String { runDirectory + "/outgoing-queue" }

    /// Takes a free slot at once, or nil.
    static func tryAcquire(runDirectory: String, limit: Int, vm: String) -> OutgoingSlot? {
        for i in 0..<limit {
            let fd = open(slotPath(runDirectory, i), O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
            guard fd >= 0 else { continue }
            if flock(fd, LOCK_EX | LOCK_NB) == 0 {
                ftruncate(fd, 0)
                let text = "\(getpid()) \(vm)\n"
                _ = text.withCString { pwrite(fd, $0, strlen($0), 0) }
                return OutgoingSlot(slot: i, fd: fd)
            }
            close(fd)
        }
        return nil
    }

    /// Takes a slot, waiting in line while all are held. `waiting` is told the position
    /// (1-based) and the length of the line, a few times a second; `check` may throw to
    /// stop waiting (a cancel or a timeout).
    public static func acquire(runDirectory: String, limit: Int, vm: String,
                               waiting: (_ position: Int, _ length: Int) -> Void,
                               check: () throws -> Void) throws -> OutgoingSlot {
        try FileManager.default.createDirectory(atPath: queueDirectory(runDirectory), withIntermediateDirectories: true)
        // Straight to a slot only when nobody waits, so that those who came first go first.
        if waiters(runDirectory).isEmpty, let slot = tryAcquire(runDirectory: runDirectory, limit: limit, vm: vm) {
            return slot
        }
        let ticket = queueDirectory(runDirectory) + "/\(UInt64(Date().timeIntervalSince1970 * 1e9))-\(getpid())"
        try vm.write(toFile: ticket, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: ticket) }
        let ticketName = (ticket as NSString).lastPathComponent
        while true {
            try check()
            let line = waiters(runDirectory)
            let position = (line.firstIndex { $0.file == ticketName } ?? 0) + 1
            if position == 1, let slot = tryAcquire(runDirectory: runDirectory, limit: limit, vm: vm) {
                return slot
            }
            waiting(position, line.count)
            Thread.sleep(forTimeInterval: 0.25)
        }
    }

    /// The line of waiting migrations, first first; tickets of dead processes are removed.
    static func waiters(_ runDirectory: String) -> [(file: String, waiter: Waiter)] {
        let dir = queueDirectory(runDirectory)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        var line: [(file: String, key: (UInt64, Int32), waiter: Waiter)] = []
        for name in names {
            let parts = name.split(separator: "-")
            guard parts.count == 2, let ns = UInt64(parts[0]), let pid = Int32(parts[1]) else { continue }
            guard ProcessStats.isAlive(pid: pid) else {
                try? FileManager.default.removeItem(atPath: dir + "/" + name)
                continue
            }
            let vm = (try? String(contentsOfFile: dir + "/" + name, encoding: .utf8)) ?? "?"
            line.append((name, (ns, pid), Waiter(pid: pid, vm: vm, since: Date(timeIntervalSince1970: Double(ns) / 1e9))))
        }
        return line.sorted { $0.key < $1.key }.map { ($0.file, $0.waiter) }
    }

    /// Who holds the slots and who waits, for `ferry status`.
    public static func snapshot(runDirectory: String) -> (holders: [Holder], waiting: [Waiter]) {
        var holders: [Holder] = []
        let names = (try? FileManager.default.contentsOfDirectory(atPath: runDirectory)) ?? []
        for name in names.sorted() where name.hasPrefix("outgoing-") && name.hasSuffix(".slot") {
            let path = runDirectory + "/" + name
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            // A slot we can lock is free.
            if flock(fd, LOCK_SH | LOCK_NB) == 0 {
                flock(fd, LOCK_UN)
                continue
            }
            let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
            let parts = text.split(separator: " ", maxSplits: 1)
            let slot = Int(name.dropFirst("outgoing-".count).dropLast(".slot".count)) ?? 0
            holders.append(Holder(slot: slot, pid: parts.first.flatMap { Int32($0) } ?? 0,
                                  vm: parts.count > 1 ? parts[1].trimmingCharacters(in: .whitespacesAndNewlines) : "?"))
        }
        return (holders, waiters(runDirectory).map(\.waiter))
    }
}
