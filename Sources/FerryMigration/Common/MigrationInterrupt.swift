import FerryIO
import FerryTransport
import FerryVM
import Foundation

/// Why a migration was asked to stop before its end.
public enum StopRequest: Sendable, Equatable {
    /// `ferry migrate --cancel NAME`, Ctrl-C or SIGTERM on `ferry migrate`.
    case cancelled
    /// `--timeout` ran out (queueing at either end counts).
    case timedOut(seconds: Int)

    public var message: String {
        switch self {
        case .cancelled: return "cancelled by the operator"
        case .timedOut(let s): return "timed out after \(s) s (--timeout)"
        }
    }
}

/// What a request to stop a migration achieved.
public enum StopAnswer: Sendable, Equatable {
    /// The migration will stop and roll back: the VM stays on the source.
    case accepted
    /// The source has sent `commit`: the destination may already run the VM, so the
    /// migration goes on to its end (never lost, never twice).
    case tooLate
    /// A stop was requested before; that one stands.
    case alreadyRequested
}

/// One migration's stop switch, shared by the migration, its `--timeout` timer and the
/// signal handler of `ferry migrate`. A stop is granted only before the commit point; it
/// wakes whatever the migration waits on: its event loop (through `wake`) and any blocking
/// read on the control connection (shut down for reading, so a stalled peer cannot hold the
/// migration; the connection can still carry the `abort` that tells the destination).
///
/// Shared by the migration's thread, the timer thread, the signal handler's thread and the
/// `--cancel` listener: `@unchecked Sendable` because every field is read and written only
/// under `lock`.
final class MigrationInterrupt: @unchecked Sendable {
    private let lock = Monitor()
    private var requested: StopRequest?
    private var pastCommitPoint = false
    private var ended = false
    private var control: FrameConnection?
    /// Once the control connection is a link, which frees its own blocked sends (its
    /// keeper gives up a stalled connection), `control` is nil.
    private var link: ControlLink?
    private var refusedLate: [StopRequest] = []
    private var wake: (@Sendable () -> Void)?

    init() {}

    /// What to call when a stop is granted (the migration's event loop posts itself an event).
    func onStop(_ body: @escaping @Sendable () -> Void) { lock.withLock { wake = body } }

    /// The request granted so far, if any.
    var pending: StopRequest? { lock.withLock { requested } }

    /// Requests that came after the commit point (for the report).
    var lateRequests: [StopRequest] { lock.withLock { refusedLate } }

    func request(_ stop: StopRequest) -> StopAnswer {
        let (answer, control, wake): (StopAnswer, FrameConnection?, (@Sendable () -> Void)?) = lock.withLock {
            if ended { return (.tooLate, nil, nil) }
            if pastCommitPoint {
                refusedLate.append(stop)
                return (.tooLate, nil, nil)
            }
            if requested != nil { return (.alreadyRequested, nil, nil) }
            requested = stop
            return (.accepted, self.control, self.wake)
        }
        if answer == .accepted {
            wake?()
            lock.withLock { link }?.wake()
            control?.socket.shutdownRead()
            // A send blocked on a stalled peer (a boot file into a full socket) does not
            // see the read side close: if the migration is still not unwinding after a
            // moment, the connection goes altogether (the destination then discards its
            // copy on the lost connection instead of on an `abort`; a rollback sending its
            // `abort` into a stalled peer is freed the same way).
            startThread("ferry-stop") { [self] in
                Thread.sleep(forTimeInterval: 3)
                if !hasEnded { control?.shutdown() }
            }
        }
        return answer
    }

    /// The control link, once there is one: a stop wakes whoever waits on it.
    func attach(_ link: ControlLink) {
        let stopped = lock.withLock { () -> Bool in
            self.link = link
            control = nil
            return requested != nil
        }
        if stopped { link.wake() }
    }

    /// The control connection, once there is one: a stop ends its blocking reads.
    func attach(_ connection: FrameConnection) {
        let stopped = lock.withLock { () -> Bool in
            control = connection
            return requested != nil
        }
        if stopped { connection.socket.shutdownRead() }
    }

    /// Throws ``MigrateError/stopped(_:)`` if a stop was granted; the steps call it
    /// between their blocking calls, so that every step unwinds the same way.
    func check() throws(MigrateError) {
        if let stop = pending { throw .stopped(stop) }
    }

    /// Called right before `commit` is sent: throws if a stop was granted, and otherwise
    /// refuses every later one.
    func passCommitPoint() throws(MigrateError) {
        let stop: StopRequest? = lock.withLock {
            if requested == nil { pastCommitPoint = true }
            return requested
        }
        if let stop { throw .stopped(stop) }
    }

    /// The migration has ended: the timer stops and late requests are refused.
    func end() { lock.withLock { ended = true } }
    var hasEnded: Bool { lock.withLock { ended } }

    /// Requests `.timedOut` once `timeout` has passed since now, unless the migration ended.
    func startTimer(_ timeout: Duration) {
        let deadline = ContinuousClock.now + timeout
        startThread("ferry-timeout") { [self] in
            while !hasEnded {
                if ContinuousClock.now >= deadline {
                    _ = request(.timedOut(seconds: Int(timeout.seconds.rounded())))
                    return
                }
                Thread.sleep(forTimeInterval: 0.1)
            }
        }
    }
}

extension VMPaths {
    /// The pid of the `ferry migrate` moving this VM, while it runs: how
    /// `ferry migrate --cancel NAME` finds it (and signals it).
    public var migrationPIDFile: String { directory + "/migrate.pid" }
}

/// Finds the running `ferry migrate` of a VM (or of a libvirt domain, ``LibvirtMigrationFile``)
/// from its pid file.
public enum RunningMigrationFile {
    public static func write(_ paths: VMPaths) { write(path: paths.migrationPIDFile) }
    public static func remove(_ paths: VMPaths) { remove(path: paths.migrationPIDFile) }
    public static func runningPID(_ paths: VMPaths) -> Int32? { runningPID(path: paths.migrationPIDFile) }

    public static func write(path: String) {
        try? "\(getpid())\n".write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// Removes the file if it names this process.
    public static func remove(path: String) {
        if pid(path: path) == getpid() { try? FileManager.default.removeItem(atPath: path) }
    }

    /// The pid in the file, whatever it is.
    static func pid(path: String) -> Int32? {
        (try? String(contentsOfFile: path, encoding: .utf8))
            .flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// The pid of a live `ferry migrate` named by the file (a stale file, or a pid reused by
    /// another program, gives nil).
    public static func runningPID(path: String) -> Int32? {
        guard let pid = pid(path: path), pid > 0, ProcessStats.isAlive(pid: pid),
              let command = ProcessStats.commandLine(pid: pid), command.contains("migrate") || command.contains("drain") else { return nil }
        return pid
    }
}
