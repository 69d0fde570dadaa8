import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Logging

/// This host's side of reconciliation: its VM records, their locks and their QEMUs. What
/// ``Reconciler`` reads and does, apart from the rules (``ReconcileRules``) so that those
/// run in tests without root.
protocol ReconcileHost: Sendable {
    /// This host's VMs.
    func records() -> [VMRecord]
    /// The VM's record; nil if it has none (or the name cannot be a VM's).
    func record(_ vm: String) -> VMRecord?
    /// Takes the VM's lock, held while the returned value lives; nil if another process
    /// holds it.
    func lock(_ vm: String) -> AnyObject?
    /// True if another process holds the VM's lock.
    func isLocked(_ vm: String) -> Bool
    /// The VM's handover record; nil if it has none; throws if one exists and cannot be read.
    func handover(of vm: String) throws -> HandoverRecord?
    /// What `record` says and, with `askQEMU`, what its QEMUs say (its own, and during an
    /// update the new one). Only for a VM whose lock this process holds: QEMU's monitor
    /// takes one client at a time.
    func facts(of record: VMRecord, askQEMU: Bool) -> ReconcileRules.VMFacts
    /// Carries out one step; throws what failed.
    func perform(_ action: ReconcileRules.Action, on vm: String) throws
    /// What is damaged about the VM's files (``DamagedVM``), or nil if nothing (or it is not here).
    func damage(of vm: String) -> String?
}

extension ReconcileHost {
    func damage(of vm: String) -> String? { nil }
}

/// The peer's daemon.
protocol PeerDaemon: Sendable {
    /// Asks the daemon at `host:port`; nil if it cannot be reached within `timeout` or
    /// answers nonsense.
    func ask(_ request: ResolveMessage, host: String, port: UInt16, timeout: Duration) -> ResolvedMessage?
}

/// The real host: ``VMStore``, ``VMLock`` and QMP.
struct StoreHost: ReconcileHost {
    let store: VMStore
    /// A QMP command here is a query or `cont`: instant for a QEMU that is not stuck.
    static let qmpTimeout: Duration = .seconds(3)
    /// QEMU leaves a cancelled migration once its migration thread sees the cancel, within
    /// a round of sending: seconds at most.
    static let cancelTimeout: Duration = .seconds(10)

    func records() -> [VMRecord] { store.list() }

    func record(_ vm: String) -> VMRecord? { try? store.record(vm) }

    func lock(_ vm: String) -> AnyObject? { try? VMLock(paths: store.vmPaths(vm), name: vm) }

    func damage(of vm: String) -> String? {
        guard case .damaged(let damaged)? = store.entry(vm) else { return nil }
        return damaged.problems.joined(separator: "; ")
    }

    func isLocked(_ vm: String) -> Bool { VMLock.isHeld(paths: store.vmPaths(vm)) }

    func handover(of vm: String) throws -> HandoverRecord? {
        guard VMSpec.validateName(vm) == nil else { return nil }  // a peer's request may name anything
        return try store.readHandover(vm)
    }

    func facts(of record: VMRecord, askQEMU: Bool) -> ReconcileRules.VMFacts {
        let state = record.state
        var facts = ReconcileRules.VMFacts(name: record.spec.name, phase: state.phase, pid: state.pid, alive: record.alive,
                                           session: state.session, update: state.update)
        guard askQEMU else { return facts }
        if record.alive { facts.qemu = Self.view(qmpSocket: record.paths.qmpSocket) }
        if state.phase == .updating, let update = state.update {
            let new = QEMUInstance.successor(record.paths, binary: update.binary, tag: update.tag)
            let pid = (try? String(contentsOfFile: new.pidFile, encoding: .utf8))
                .flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            if let pid, VMStore.isQEMU(pid: pid, name: record.spec.name) {
                facts.successor = ReconcileRules.Successor(pid: pid, qemu: Self.view(qmpSocket: new.qmpSocket))
            }
        }
        return facts
    }

    /// What the QEMU at `qmpSocket` says of its run state and its migration.
    static func view(qmpSocket: String) -> ReconcileRules.QEMUView {
        do {
            let qmp = try QMPClient(path: qmpSocket, timeout: qmpTimeout)
            defer { qmp.close() }
            return .answered(try qmp.queryStatus(), try qmp.queryMigrate().status)
        } catch {
            return .unreachable("\(error)")
        }
    }

    func perform(_ action: ReconcileRules.Action, on vm: String) throws {
        let paths = store.vmPaths(vm)
        func successor(_ update: UpdateInProgress) -> QEMUInstance {
            QEMUInstance.successor(paths, binary: update.binary, tag: update.tag)
        }
        switch action {
        case .discard(let reason):
            try store.stop(vm, reason: reason)
        case .archive(let reason):
            store.archiveAndRemove(vm, reason: reason)
            if FileManager.default.fileExists(atPath: paths.directory) { throw VMError.io("cannot remove \(paths.directory)") }
        case .cancelMigration:
            try Self.withQMP(paths.qmpSocket) { qmp in
                _ = qmp.takeBack(cancel: true, timeout: Self.cancelTimeout) { _ in false }
                let status = try qmp.queryMigrate().status
                guard status.hasEnded else { throw VMError.qemu("its migration is still \(status) after migrate_cancel") }
            }
        case .resume:
            // A destination's committed copy: its taps join the network first (a source
            // taking its VM back finds them there already).
            let nics = (try? store.record(vm))?.spec.nics ?? []
            try GuestNICs.connect(nics)
            try Self.resume(qmpSocket: paths.qmpSocket)
            if !nics.isEmpty { try Self.withQMP(paths.qmpSocket) { try GuestNICs.announce($0) } }
        case .clearHandover:
            try store.removeHandover(vm)
        case .setRunning(let session):
            try store.setPhase(vm, .running, session: session)
        case .recordCommitted(var record):
            record.at = Date()
            try store.recordHandover(vm, record)
        case .stopQEMU(let pid):
            try Self.stop(pid: pid, qmpSocket: paths.qmpSocket)
        case .stopSuccessor(let pid, let update):
            try Self.stop(pid: pid, qmpSocket: successor(update).qmpSocket)
        case .resumeSuccessor(let update):
            try Self.resume(qmpSocket: successor(update).qmpSocket)
        case .adoptSuccessor(let pid, let update):
            let new = successor(update)
            // The log first: after the adoption no pass would move it.
            if let log = new.log { try Self.move(log, to: paths.qemuLog) }
            try store.adopt(vm, pid: pid, qmpSocket: new.qmpSocket, binary: update.binary)
        case .removeUpdateSocket:
            try Self.remove(paths.updateSocket)
        case .removeSuccessorSocket(let update):
            try Self.remove(successor(update).qmpSocket)
        case .resumePostcopy(let host, let port):
            try Self.startResume(vm, to: host, port: port, paths: paths, stateDirectory: store.paths.root)
        }
    }

    /// `ferry migrate VM --to HOST:PORT` in a process of its own (this daemon's binary and
    /// environment, the host's state directory), which resumes the VM's postcopy migration
    /// once this pass lets go of the VM's lock; its report goes to the VM's directory.
    private static func startResume(_ vm: String, to host: String, port: UInt16, paths: VMPaths, stateDirectory: String) throws {
        try Command.startOwn(["migrate", vm, "--to", "\(host):\(port)", "--state-dir", stateDirectory, "--quiet",
                              "--report-file", paths.directory + "/resume-report.json"],
                             log: paths.directory + "/resume.log")
    }

    private static func withQMP(_ socket: String, _ body: (QMPClient) throws -> Void) throws {
        let qmp = try QMPClient(path: socket, timeout: qmpTimeout)
        defer { qmp.close() }
        try body(qmp)
    }

    /// `cont` if the guest is paused (``QMPClient/takeBack(cancel:timeout:resume:)``).
    private static func resume(qmpSocket: String) throws {
        try withQMP(qmpSocket) { qmp in
            let done = qmp.takeBack(cancel: false, resume: { _ in true })
            if let error = done.resumeError { throw error }
        }
    }

    private static func stop(pid: Int32, qmpSocket: String) throws {
        guard QEMU.stop(pid: pid, qmpSocket: qmpSocket) else { throw VMError.qemu("QEMU pid \(pid) does not exit") }
    }

    /// Removes `path`; one already gone is fine.
    private static func remove(_ path: String) throws {
        guard unlink(path) == 0 || errno == ENOENT else {
            throw VMError.io("cannot remove \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// Renames `from` to `to`; a `from` already gone is fine.
    private static func move(_ from: String, to: String) throws {
        guard rename(from, to) == 0 || errno == ENOENT else {
            throw VMError.io("cannot rename \(from) to \(to): \(String(cString: strerror(errno)))")
        }
    }
}

/// The peer's daemon over an authenticated connection (``HandshakeRunner``), as a
/// migration's control connection.
struct DaemonPeer: PeerDaemon {
    let keys: KeyRing?
    let logger: Logger

    func ask(_ request: ResolveMessage, host: String, port: UInt16, timeout: Duration) -> ResolvedMessage? {
        do {
            let socket = try Socket.connectTCP(host: host, port: port, timeout: timeout)
            defer { socket.close() }
            socket.setReceiveTimeout(timeout)
            socket.setUserTimeout(timeout)
            let control = FrameConnection(socket: socket)
            _ = try HandshakeRunner.source(control, keys: keys, host: HostInfo.hostname)
            try control.send(.resolve, request)
            return try control.expect(.resolved, as: ResolvedMessage.self)
        } catch {
            logger.info("cannot settle a switchover with the peer", metadata: ["peer": "\(host):\(port)", "vm": "\(request.vm)", "error": "\(error)"])
            return nil
        }
    }
}
