import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Logging

/// Rebuilds this host's view after a crash and settles half-done migrations from the
/// durable handover records (``HandoverRecord``) and the QEMUs that run: exactly one copy
/// of each VM resumes, the other is destroyed. `ferry serve` runs it at start and every
/// few seconds; `ferry vm list` runs it without the network (local repairs only).
///
/// The rules, by what this host finds (docs/PROTOCOL.md, "Switchover and crashes"):
/// - A VM migrating out whose migration process is gone:
///   - with a `commit` record: the destination runs the VM; once it says so, the source
///     copy is stopped and removed. If the destination says it has no copy, the source
///     copy resumes (it is then the only one). Unreachable: the source copy stays paused.
///   - without one: the migration never committed and now never will; the source copy
///     resumes (its QEMU's migration cancelled, `cont` if it was paused).
/// - An incoming VM that no session of this daemon is receiving:
///   - `committed`: the source decided; the VM runs here (`cont` if the crash came first).
///   - `prepared`: only the source's decision may run or discard it: ask the source.
///   - no record: it never reached `loaded`, so the source cannot commit it: discarded.
/// - A VM in a same-host update whose `ferry vm update` is gone: kept in whichever QEMU
///   holds it (``settleUpdate(_:)``).
public final class Reconciler: @unchecked Sendable {
    private let store: VMStore
    private let keys: KeyRing?
    private let logger: Logger
    /// How long to wait for a peer daemon (connect, handshake, answer).
    public var peerTimeout: Duration = .seconds(3)

    public init(store: VMStore, keys: KeyRing?, logger: Logger) {
        self.store = store
        self.keys = keys
        self.logger = logger
    }

    /// One pass over this host's VMs. `busy`: VMs a live session of this daemon is
    /// handling (left alone). `network`: false settles only what needs no peer.
    /// Returns one line per VM it acted on or that waits for a peer.
    @discardableResult
    public func reconcile(busy: Set<String> = [], network: Bool = true) -> [String] {
        var notes: [String] = []
        for record in store.list() where !busy.contains(record.spec.name) {
            let name = record.spec.name
            switch record.state.phase {
            case .migratingOut:
                guard !VMLock.isHeld(paths: record.paths), let lock = try? VMLock(paths: record.paths, name: name) else { continue }
                if let note = settleSource(record, network: network) { notes.append(note) }
                _ = lock
            case .incoming:
                guard !VMLock.isHeld(paths: record.paths), let lock = try? VMLock(paths: record.paths, name: name) else { continue }
                if let note = settleDestination(record, network: network) { notes.append(note) }
                _ = lock
            case .updating:
                guard !VMLock.isHeld(paths: record.paths), let lock = try? VMLock(paths: record.paths, name: name) else { continue }
                notes.append(settleUpdate(record))
                _ = lock
            default:
                continue
            }
        }
        for note in notes { logger.notice("\(note)") }
        return notes
    }

    // MARK: Source side

    /// A VM migrating out with no live migration process (lock held by the caller).
    func settleSource(_ record: VMRecord, network: Bool) -> String? {
        let name = record.spec.name
        guard let handover = store.handover(name), handover.role == .source, handover.decision == .commit else {
            return rollBackSource(record)
        }
        guard network else { return "\(name): commit recorded; waiting for ferry serve to settle it with \(handover.peerHost)" }
        let answer = ask(handover, ResolveMessage(session: handover.session, vm: name, decision: .commit))
        switch answer?.state {
        case .running?:
            guard (try? store.stop(name, reason: "migrated")) != nil else {
                return "\(name): the migration to \(handover.peerHost) had committed, but the source copy's QEMU does not exit"
            }
            return "\(name): the migration to \(handover.peerHost) had committed; the VM runs there, the source copy is stopped"
        case .gone?:
            // The destination has no copy (its QEMU died): the source copy is the only one.
            let resumed = resume(record)
            store.clearHandover(name)
            try? store.setPhase(name, .running)
            return "\(name): committed, but \(handover.peerHost) has no copy (\(answer?.detail ?? "")); the source copy "
                + (resumed ? "runs again" : "could not be resumed")
        default:
            return "\(name): commit recorded; \(handover.peerHost) did not answer (\(answer?.detail ?? "unreachable")), the source copy stays paused"
        }
    }

    /// No commit was recorded and the migration process is gone: the VM stays here.
    private func rollBackSource(_ record: VMRecord) -> String? {
        let name = record.spec.name
        store.clearHandover(name)
        guard record.alive else {
            store.archiveAndRemove(name, reason: "died")
            return "\(name): its QEMU died during a migration (pid \(record.state.pid)); nothing of it runs here"
        }
        let done = takeBack(record) { $0.status.isPausedByMigration || $0.status == .paused }
        try? store.setPhase(name, .running)
        return "\(name): the migration never committed; the VM stays here" + done.map { ", " + $0 }.joined()
    }

    /// Cancels the VM's QEMU's migration if one is under way, and resumes the guest if
    /// `resume` says so of its paused state. What was done, as phrases for a note.
    private func takeBack(_ record: VMRecord, resume: (RunState) -> Bool) -> [String] {
        guard let qmp = try? QMPClient(path: record.paths.qmpSocket, timeout: .seconds(3)) else { return [] }
        defer { qmp.close() }
        var done: [String] = []
        if let info = try? qmp.queryMigrate(), !info.status.hasEnded {
            qmp.cancelMigration(timeout: .seconds(10))
            done.append("its QEMU's migration cancelled")
        }
        if let state = try? qmp.queryStatus(), !state.running, resume(state) {
            done.append((try? qmp.execute("cont")) != nil ? "resumed" : "but it could not be resumed")
        }
        return done
    }

    // MARK: Same-host update

    /// A same-host update whose `ferry vm update` is gone (lock held by the caller). Both
    /// QEMUs map the same RAM, so exactly one may ever run the guest:
    /// - the new QEMU runs it (`cont` was given): the update had switched; the old QEMU
    ///   quits and the new one is adopted;
    /// - the old QEMU lives: the update is undone; the new QEMU (which never ran the
    ///   guest) quits, the old one's migration is cancelled and it runs again if it ran;
    /// - only the new QEMU lives and it has loaded the whole VM: the old one died after
    ///   sending it; the new one is adopted and runs it if the guest ran;
    /// - neither holds the VM: its QEMU died; nothing of it runs.
    func settleUpdate(_ record: VMRecord) -> String {
        let name = record.spec.name
        guard let update = record.state.update else {
            // Phase without the record (an older Ferry): the old QEMU is all there is.
            try? store.setPhase(name, .running)
            return "\(name): an update was interrupted; the VM stays in its QEMU (pid \(record.state.pid))"
        }
        let successor = QEMUInstance.successor(record.paths, binary: update.binary, tag: update.tag)
        let newPID = (try? String(contentsOfFile: successor.pidFile, encoding: .utf8))
            .flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            .flatMap { VMStore.isQEMU(pid: $0, name: name) ? $0 : nil }
        let newQMP = newPID.flatMap { _ in try? QMPClient(path: successor.qmpSocket, timeout: .seconds(3)) }
        defer { newQMP?.close() }
        let newRuns = (try? newQMP?.queryStatus())?.running ?? false
        let newLoaded = (try? newQMP?.queryMigrate())?.status == .completed
        try? FileManager.default.removeItem(atPath: record.paths.updateSocket)
        if let newPID, newRuns || (!record.alive && newLoaded) {
            if record.alive { QEMU.stop(pid: record.state.pid, qmpSocket: record.paths.qmpSocket) }
            if !newRuns && update.wasRunning { _ = try? newQMP?.execute("cont") }
            do {
                try store.adopt(name, pid: newPID, qmpSocket: successor.qmpSocket, binary: update.binary)
            } catch {
                return "\(name): an update was interrupted after its switchover; the VM runs in QEMU pid \(newPID), but its record could not be updated: \(error)"
            }
            if let log = successor.log { _ = rename(log, record.paths.qemuLog) }
            return "\(name): an update was interrupted after its switchover; the VM runs in the new QEMU (pid \(newPID))"
                + (record.alive ? ", the old one is stopped" : "")
        }
        if let newPID { QEMU.stop(pid: newPID, qmp: newQMP) }
        try? FileManager.default.removeItem(atPath: successor.qmpSocket)
        guard record.alive else {
            store.archiveAndRemove(name, reason: "died")
            return "\(name): its QEMU died during an update (pid \(record.state.pid)); nothing of it runs here"
        }
        let done = takeBack(record) { _ in update.wasRunning }
        try? store.setPhase(name, .running)
        return "\(name): an update was interrupted before its switchover; the VM stays in its QEMU (pid \(record.state.pid))"
            + done.map { ", " + $0 }.joined()
    }

    // MARK: Destination side

    /// An incoming VM that no live session is receiving (lock held by the caller).
    func settleDestination(_ record: VMRecord, network: Bool) -> String? {
        let name = record.spec.name
        guard let handover = store.handover(name), handover.role == .destination else {
            // Without the daemon's view of its live sessions, a VM being received now
            // looks the same: only `ferry serve` discards these.
            guard network else { return nil }
            discard(record, reason: "incoming-stale")
            return "\(name): a half-received VM (never loaded) was discarded"
        }
        guard record.alive else {
            store.clearHandover(name)
            discard(record, reason: "incoming-died")
            return "\(name): its destination QEMU died before it ran; nothing of it runs here"
        }
        switch handover.decision {
        case .committed:
            return run(record, handover) ? "\(name): committed before the crash; it runs here" : "\(name): committed, but its QEMU would not run it"
        case .prepared:
            guard network else { return "\(name): loaded and paused; waiting for \(handover.peerHost)'s decision" }
            let answer = ask(handover, ResolveMessage(session: handover.session, vm: name, decision: nil))
            switch answer?.state {
            case .commit?:
                return commit(record, handover) ? "\(name): \(handover.peerHost) had committed; the VM runs here" : "\(name): commit failed here"
            case .abort?:
                discard(record, reason: "incoming-aborted")
                return "\(name): \(handover.peerHost) never committed; the paused copy here is discarded"
            default:
                return "\(name): loaded and paused; \(handover.peerHost) has not decided (\(answer?.detail ?? "unreachable"))"
            }
        case .commit:
            return nil  // not a destination's decision
        }
    }

    /// Records `committed`, then runs the VM. True if it runs.
    @discardableResult
    func commit(_ record: VMRecord, _ handover: HandoverRecord) -> Bool {
        var committed = handover
        committed.decision = .committed
        committed.at = Date()
        guard (try? store.recordHandover(record.spec.name, committed)) != nil else { return false }
        return run(record, committed)
    }

    private func run(_ record: VMRecord, _ handover: HandoverRecord) -> Bool {
        let name = record.spec.name
        guard let qmp = try? QMPClient(path: record.paths.qmpSocket, timeout: .seconds(3)) else { return false }
        defer { qmp.close() }
        if let state = try? qmp.queryStatus(), !state.running {
            guard (try? qmp.execute("cont")) != nil else { return false }
        }
        try? store.setPhase(name, .running, session: handover.session)
        store.clearHandover(name)
        return true
    }

    /// Stops the copy's QEMU and forgets the VM (``VMStore/stop``). False if its QEMU
    /// would not exit, in which case the VM (and its record) stay for the next pass.
    @discardableResult
    private func discard(_ record: VMRecord, reason: String) -> Bool {
        (try? store.stop(record.spec.name, reason: reason)) != nil
    }

    private func resume(_ record: VMRecord) -> Bool {
        guard record.alive, let qmp = try? QMPClient(path: record.paths.qmpSocket, timeout: .seconds(3)) else { return false }
        defer { qmp.close() }
        if let state = try? qmp.queryStatus(), state.running { return true }
        return (try? qmp.execute("cont")) != nil
    }

    // MARK: Answering a peer

    /// Answers a peer's ``ResolveMessage`` from this host's records and QEMUs.
    public func answer(_ request: ResolveMessage) -> ResolvedMessage {
        let record = try? store.record(request.vm)
        let handover = store.handover(request.vm)
        if let decision = request.decision {
            // The asker is the source; this host is (or was) the destination.
            if let record, let handover, handover.role == .destination, handover.session == request.session {
                let lock = try? VMLock(paths: record.paths, name: request.vm)
                guard lock != nil else { return ResolvedMessage(state: .pending, detail: "a session here still handles it; ask again") }
                if decision == .commit {
                    if commit(record, handover) { return ResolvedMessage(state: .running, detail: "committed on request") }
                    // Saying `gone` lets the source resume its copy: this one must never run.
                    guard discard(record, reason: "incoming-failed") else {
                        return ResolvedMessage(state: .pending, detail: "its QEMU here neither runs it nor exits")
                    }
                    return ResolvedMessage(state: .gone, detail: "its QEMU here would not run it; discarded")
                }
                guard discard(record, reason: "incoming-aborted") else {
                    return ResolvedMessage(state: .pending, detail: "its QEMU here does not exit")
                }
                return ResolvedMessage(state: .gone, detail: "discarded on the source's abort")
            }
            if let record, record.state.session == request.session, record.alive {
                return ResolvedMessage(state: .running, detail: "it runs here")
            }
            return ResolvedMessage(state: .gone, detail: "no copy of \(request.vm) for this session here")
        }
        // The asker is the destination; this host is (or was) the source.
        if let handover, handover.role == .source, handover.session == request.session, handover.decision == .commit {
            return ResolvedMessage(state: .commit, detail: "the source recorded its commit at \(ISO8601DateFormatter().string(from: handover.at))")
        }
        if let record, record.state.phase == .migratingOut, VMLock.isHeld(paths: record.paths) {
            return ResolvedMessage(state: .pending, detail: "the migration is still running on the source")
        }
        return ResolvedMessage(state: .abort, detail: "the source never committed this session")
    }

    // MARK: Asking a peer

    /// Asks the peer's daemon; nil if it cannot be reached or answers nonsense.
    func ask(_ handover: HandoverRecord, _ request: ResolveMessage) -> ResolvedMessage? {
        do {
            let socket = try Socket.connectTCP(host: handover.peerHost, port: handover.peerPort, timeout: peerTimeout)
            defer { socket.close() }
            socket.setReceiveTimeout(peerTimeout)
            socket.setUserTimeout(peerTimeout)
            let control = FrameConnection(socket: socket)
            _ = try HandshakeRunner.source(control, keys: keys, host: HostInfo.hostname)
            try control.send(.resolve, request)
            return try control.expect(.resolved, as: ResolvedMessage.self)
        } catch {
            logger.info("cannot settle a switchover with the peer", metadata: ["peer": "\(handover.peerHost):\(handover.peerPort)", "vm": "\(request.vm)", "error": "\(error)"])
            return nil
        }
    }

    /// The host part of "host:port" or "[v6]:port".
    public static func host(ofPeer peer: String) -> String {
        if peer.hasPrefix("["), let end = peer.firstIndex(of: "]") { return String(peer[peer.index(after: peer.startIndex)..<end]) }
        if let colon = peer.lastIndex(of: ":") { return String(peer[..<colon]) }
        return peer
    }
}
