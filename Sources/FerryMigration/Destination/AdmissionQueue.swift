import FerryIO
import FerryVM
import Foundation

/// `ferry serve --max-migrations N`: at most N incoming migrations transfer at once on this
/// host; more are accepted and wait in line, first come first served. A migration takes its
/// place once its boot files have arrived and before its QEMU starts, so a waiting one holds
/// no QEMU and no guest memory, only its control connection. Waiting is visible: the session
/// sends its position in `status` frames, and the daemon writes the whole picture to
/// `<run>/incoming.json` for `ferry status`.
///
/// Shared by the daemon's session threads: each joins, waits for its turn and leaves.
/// `changed` is called outside the lock, on the thread that made the change, one call at a
/// time and always with the picture as it is when the call starts: two sessions that join
/// at once never leave the older picture in the file (which `ferry status` then showed
/// until the next change, a queue that was never seen).
// `running` and `waiting` are under `monitor`; `publishing` orders the calls of `changed`;
// the rest is immutable.
final class AdmissionQueue: @unchecked Sendable {
    let limit: Int
    private let monitor = Monitor()
    /// Sessions waiting for their turn; broadcast when places are given out.
    private let promoted: Monitor.Condition
    private var running: [IncomingMigrations.Entry] = []
    private var waiting: [IncomingMigrations.Entry] = []
    private let changed: @Sendable (IncomingMigrations) -> Void
    private let publishing = NSLock()

    init(limit: Int, changed: @escaping @Sendable (IncomingMigrations) -> Void) {
        self.limit = max(1, limit)
        self.changed = changed
        promoted = monitor.makeCondition()
    }

    /// Joins the line (or runs at once when a place is free).
    func enqueue(session: String, vm: String, source: String) {
        monitor.withLock {
            waiting.append(.init(session: session, vm: vm, source: source, since: Date()))
            promote()
        }
        publish()
    }

    /// Waits up to `timeout` for the session's turn. Its place in line, or nil once it runs.
    func wait(session: String, timeout: Duration) -> (position: Int, length: Int)? {
        monitor.lock()
        defer { monitor.unlock() }
        let deadline = ContinuousClock.now + timeout
        while true {
            if running.contains(where: { $0.session == session }) { return nil }
            guard let index = waiting.firstIndex(where: { $0.session == session }) else { return nil }
            if !promoted.wait(until: deadline) { return (index + 1, waiting.count) }
        }
    }

    /// The session ended (ran, failed or gave up in line): its place goes to the next.
    func remove(session: String) {
        let removed = monitor.withLock { () -> Bool in
            let before = running.count + waiting.count
            running.removeAll { $0.session == session }
            waiting.removeAll { $0.session == session }
            guard running.count + waiting.count != before else { return false }
            promote()
            return true
        }
        if removed { publish() }
    }

    /// Hands the picture to `changed`. The snapshot is taken once this call's turn has come,
    /// so the last call always carries the last change, whichever thread made it.
    private func publish() {
        publishing.withLock { changed(snapshot) }
    }

    var snapshot: IncomingMigrations { monitor.withLock { current() } }

    /// Migrations transferring now.
    var runningCount: Int { monitor.withLock { running.count } }

    /// Gives free places to the first in line (lock held).
    private func promote() {
        var moved = false
        while running.count < limit && !waiting.isEmpty {
            var next = waiting.removeFirst()
            next.admittedAt = Date()
            running.append(next)
            moved = true
        }
        if moved { promoted.broadcast() }
    }

    private func current() -> IncomingMigrations {
        IncomingMigrations(pid: getpid(), limit: limit, running: running, queued: waiting, updatedAt: Date())
    }
}

// `IncomingMigrations`, the file this queue's daemon writes, is in FerryVM/StateFiles.swift
// with the other state files and their readers.
