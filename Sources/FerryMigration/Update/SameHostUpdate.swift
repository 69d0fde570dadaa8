import FerryIO
import FerryQMP
import FerryVM
import FerryWire
import Foundation
import Logging

/// What the operator asks of a same-host update.
public struct UpdateOptions: Sendable {
    /// The QEMU binary the VM moves to (default: the one ``QEMU/binary`` names now, so that
    /// after a package upgrade the VM moves to the upgraded QEMU).
    public var qemuBinary: String
    /// The longest pause of the guest QEMU may plan for (only device state moves, so the
    /// real pause is far below it).
    public var downtimeLimit: Duration = .milliseconds(300)
    /// Give up (the VM stays on its QEMU) if the switchover has not happened by then.
    public var timeout: Duration = .seconds(60)

    public init(qemuBinary: String = QEMU.binary) {
        self.qemuBinary = qemuBinary
    }
}

/// The new QEMU of a same-host update, once started.
struct SuccessorQEMU {
    let instance: QEMUInstance
    let qmp: QMPClient
    let pid: Int32
    let version: String
    var cpuSeconds: Double?
}

/// Moves a running VM to a second QEMU on the same host without copying its RAM: the
/// `ferry vm update` and `ferry migrate --to localhost` path.
///
/// The VM's RAM is a shared file on tmpfs (``VMPaths/memoryFile``). A second QEMU maps
/// the same file and waits with `-S -incoming`; both get QEMU's `x-ignore-shared`
/// capability, which leaves shared RAM blocks out of the stream, and the old QEMU migrates
/// straight into the new one over a Unix socket. Only device state (and the small
/// non-shared blocks: BIOS, option ROMs) moves, so time and downtime do not grow with the
/// VM's memory. No Ferry relay and no daemon take part.
///
/// Its steps (``PhaseGraph/sameHostUpdate``): attach the old QEMU, start the new one
/// (`starting-destination`), old into new (`transferring`, then `switchover` at QEMU's
/// STOP), wait for the new one to hold the VM, `cont` it (`committing`), stop the old one.
/// The switchover follows the network migration's rule: the new QEMU stays paused until
/// the old one has finished and sits in `postmigrate`; then the new one gets `cont`, and
/// only then does the old one quit. Any failure before `cont` stops the new QEMU (and
/// makes sure it is gone) before the old one is resumed, so the VM is never lost and never
/// runs twice.
///
/// Threads: everything runs on the caller's thread, which owns all state here; the old
/// QEMU's event handler (QMP's reader thread) only records the STOP time, under a lock.
public final class SameHostUpdate {
    /// The report's `mode` line.
    public static let modeDescription = "same-host update, memory kept in place (x-ignore-shared)"

    private let store: VMStore
    private let name: String
    private let options: UpdateOptions
    private let track: MigrationRun
    private var old: LocalQEMU?
    private var new: SuccessorQEMU?
    /// The successor's files, known before it starts (a rollback removes them).
    private var newInstance: QEMUInstance?
    /// The VM's pid as claimed, for the report's host line.
    private var oldPID: Int32 = 0
    private let stopAt = Locked<Double?>(nil)

    public init(store: VMStore, name: String, options: UpdateOptions, logger: Logger,
                progress: @escaping @Sendable (MigrationProgress) -> Void) {
        self.store = store
        self.name = name
        self.options = options
        track = MigrationRun(vm: name, graph: .sameHostUpdate, logger: logger, progress: progress)
    }

    /// Runs the update to its end. Never throws: the report says what happened.
    public func run() -> MigrationReport {
        let claimed: (VMRecord, VMLock)
        do {
            claimed = try store.claimRunning(name)
        } catch {
            return report(.failedVMOnSource, error: error.description)
        }
        let (record, lock) = claimed
        defer { withExtendedLifetime(lock) {} }
        oldPID = record.state.pid
        do {
            try update(record)
            return report(.succeeded, error: nil)
        } catch {
            let failedPhase = track.noteFailure(error.description)
            let (repair, safe) = rollBack(record)
            return report(MigrationOutcome.of(error, vmSafe: safe), error: error.description + (repair.map { "; " + $0 } ?? ""),
                          failedPhase: failedPhase)
        }
    }

    private func update(_ record: VMRecord) throws(UpdateError) {
        var old = try attachOld(record)
        let new = try startNew(record, wasRunning: old.wasRunning)
        try send(&old, into: new, paths: record.paths)
        try awaitLoaded(old, new)
        try switchOver(old, new)
        finish(&old, new: new, paths: record.paths)
    }

    private func move(to phase: MigrationPhase) throws(UpdateError) {
        do {
            try track.move(to: phase, streamBytes: track.journal.lastInfo?.transferredBytes ?? 0)
        } catch {
            throw .illegal(error)
        }
    }

    /// Step: the VM's QEMU, which must keep its RAM in the shared file.
    private func attachOld(_ record: VMRecord) throws(UpdateError) -> LocalQEMU {
        let paths = record.paths
        guard VMStore.mapsMemory(pid: record.state.pid, file: paths.memoryFile) else {
            throw .memoryNotShared(name: name, file: paths.memoryFile)
        }
        let old: LocalQEMU
        do {
            old = try LocalQEMU.attach(socket: paths.qmpSocket, pid: record.state.pid)
        } catch {
            throw .oldQEMU(error)
        }
        self.old = old
        old.qmp.eventHandler = { [stopAt] event in
            if event.name == "STOP" { stopAt.withLock { $0 = event.timestamp } }
        }
        return old
    }

    /// Step: the successor, same spec, same RAM file, its own QMP socket and pid file, on
    /// record before it starts, so that the update can be settled if this process dies
    /// (the reconciler of `ferry vm list` and `ferry serve`).
    private func startNew(_ record: VMRecord, wasRunning: Bool) throws(UpdateError) -> SuccessorQEMU {
        let paths = record.paths
        let tag = String(format: "%06x", UInt32.random(in: 0...0xFF_FFFF))
        do {
            try store.beginUpdate(name, UpdateInProgress(tag: tag, binary: options.qemuBinary, wasRunning: wasRunning))
        } catch {
            throw .store(doing: "record the update", (error as? VMError) ?? .io("\(error)"))
        }
        try move(to: .startingDestination)
        let instance = QEMUInstance.successor(paths, binary: options.qemuBinary, tag: tag)
        newInstance = instance
        let launched: (Int32, QMPClient)
        do {
            // The NICs' taps are the old QEMU's own open files, shared (never reopened: a
            // single-queue tap is open in one place only). The new QEMU reads from them once
            // it runs; the old one, stopped, no longer does.
            let taps = try TapSet.borrow(record.spec.nics, from: record.state.pid)
            defer { taps.close() }
            launched = try QEMU.launch(spec: record.spec, paths: paths, store: store.bootFiles, incoming: true, instance: instance, taps: taps)
        } catch {
            throw .newQEMUDidNotStart("\(error)")
        }
        let (pid, qmp) = launched
        var version = "?"
        if let v = try? qmp.execute("query-version")["qemu"] {
            version = [v["major"], v["minor"], v["micro"]].map { $0?.uint64.map(String.init) ?? "?" }.joined(separator: ".")
        }
        let successor = SuccessorQEMU(instance: instance, qmp: qmp, pid: pid, version: version)
        new = successor
        track.note("new QEMU \(version) (\(options.qemuBinary), pid \(pid)) waiting, RAM mapped from \(paths.memoryFile)")
        try? FileManager.default.removeItem(atPath: paths.updateSocket)
        do {
            try qmp.setMigrationCapabilities([("x-ignore-shared", true), ("events", true)])
            try qmp.execute("migrate-incoming", arguments: ["uri": .string("unix:\(paths.updateSocket)")])
        } catch {
            throw .newQEMU(doing: "prepare the new QEMU", error)
        }
        return successor
    }

    /// Step: old QEMU into new QEMU, device state only, until the old one has sent it all.
    private func send(_ old: inout LocalQEMU, into new: SuccessorQEMU, paths: VMPaths) throws(UpdateError) {
        try move(to: .transferring)
        do {
            try old.qmp.setMigrationCapabilities([("x-ignore-shared", true), ("multifd", false), ("events", true)])
            try old.qmp.setMigrationParameters([
                "max-bandwidth": .number(100_000_000_000),
                "downtime-limit": .number(Double(options.downtimeLimit.milliseconds)),
            ])
        } catch {
            throw .oldQEMU(.command(doing: "configure the VM's QEMU", error))
        }
        track.journal.migrateIssuedAt = track.elapsed
        do {
            try old.qmp.execute("migrate", arguments: ["uri": .string("unix:\(paths.updateSocket)")])
        } catch {
            throw .oldQEMU(.command(doing: "start the migration", error))
        }
        old.migrateStarted = true
        self.old = old
        let deadline = ContinuousClock.now + options.timeout
        // QEMU's MIGRATION events say when its state changes; the wait wakes for them, and
        // every 50 ms to see whether the new QEMU still lives.
        while true {
            let event = old.qmp.nextEvent(named: ["MIGRATION"], timeout: .milliseconds(50))
            if stopAt.current != nil { try move(to: .switchover) }
            if let status = event?.data["status"]?.string.map(MigrationStatus.init(qemuName:)), status.hasEnded {
                let info = try follow(old.qmp)
                if info.status == .completed { break }
            }
            if !ProcessStats.isAlive(pid: new.pid) {
                // A new QEMU that fails to load the device state dies just after the old
                // one paused the VM for it, perhaps before its STOP event came: the VM not
                // running in the old QEMU says the switchover had begun.
                if old.wasRunning, let state = try? old.qmp.queryStatus(), !state.running { try move(to: .switchover) }
                _ = try follow(old.qmp)
                throw .newQEMUExited(pid: new.pid)
            }
            if ContinuousClock.now > deadline { throw .timedOut(seconds: Int(options.timeout.seconds), waitingFor: nil) }
        }
        track.journal.completedAt = track.elapsed
        try move(to: .switchover)
        let info = track.journal.lastInfo
        track.note("old QEMU finished sending (\(Format.bytes(info?.transferredBytes ?? 0)), QEMU downtime "
                 + "\(info?.downtimeMilliseconds.map(Format.millis) ?? "?"))")
    }

    /// QEMU's account of the old side's migration; throws if it failed or was cancelled.
    private func follow(_ qmp: QMPClient) throws(UpdateError) -> MigrationInfo {
        let info: MigrationInfo
        do {
            info = try qmp.queryMigrate()
        } catch {
            throw .oldQEMU(.command(doing: "follow the migration", error))
        }
        track.journal.lastInfo = info
        do {
            try QEMUFailure.check(info.status, reason: info.errorDescription)
        } catch {
            throw .oldQEMU(error)
        }
        return info
    }

    /// Step: the old QEMU done for good (postmigrate), the new one holding the VM, paused.
    private func awaitLoaded(_ old: LocalQEMU, _ new: SuccessorQEMU) throws(UpdateError) {
        // QEMU reports the migration completed a moment before its run state leaves
        // finish-migrate for postmigrate, and sends no event for that change: ask, every
        // 2 ms, for 2 s at most.
        let settle = ContinuousClock.now + .seconds(2)
        var oldState = try oldStatus(old)
        while oldState == .finishMigrate && ContinuousClock.now < settle {
            usleep(2000)
            oldState = try oldStatus(old)
        }
        guard oldState == .postmigrate else { throw .oldQEMUNotDone(oldState) }
        let deadline = ContinuousClock.now + options.timeout
        while true {
            let info: MigrationInfo
            do {
                info = try new.qmp.queryMigrate()
            } catch {
                throw .newQEMU(doing: "follow the new QEMU", error)
            }
            if info.status == .completed { break }
            if info.status == .failed { throw .newQEMUCannotLoad(reason: info.errorDescription) }
            guard ProcessStats.isAlive(pid: new.pid) else { throw .newQEMUExited(pid: new.pid) }
            if ContinuousClock.now > deadline {
                throw .timedOut(seconds: Int(options.timeout.seconds), waitingFor: "the new QEMU's loading of the VM")
            }
            // Its MIGRATION event says when it is done; wake for it or to check it lives.
            _ = new.qmp.nextEvent(named: ["MIGRATION"], timeout: .milliseconds(50))
        }
        let state: RunState
        do {
            state = try new.qmp.queryStatus()
        } catch {
            throw .newQEMU(doing: "query the new QEMU", error)
        }
        guard !state.running else { throw .newQEMURanEarly(state.status) }
    }

    private func oldStatus(_ old: LocalQEMU) throws(UpdateError) -> QEMURunStatus {
        do {
            return try old.qmp.queryStatus().status
        } catch {
            throw .oldQEMU(.command(doing: "query the VM's QEMU", error))
        }
    }

    /// Step: the VM runs in the new QEMU (if it ran before).
    private func switchOver(_ old: LocalQEMU, _ new: SuccessorQEMU) throws(UpdateError) {
        try move(to: .committing)
        FaultPoint.updateBeforeCont.pause()
        if old.wasRunning {
            do {
                try new.qmp.execute("cont")
            } catch {
                throw .newQEMU(doing: "start the VM in the new QEMU", error)
            }
        }
        FaultPoint.updateAfterCont.pause()
        if let stop = stopAt.current { track.journal.switchoverMilliseconds = (Date().timeIntervalSince1970 - stop) * 1000 }
        track.note(old.wasRunning ? "VM runs in the new QEMU" : "VM is in the new QEMU (paused, as it was)")
    }

    /// Step: past `cont` the new QEMU holds the VM; the old one only quits.
    private func finish(_ old: inout LocalQEMU, new: SuccessorQEMU, paths: VMPaths) {
        if (try? new.qmp.setMigrationCapabilities([("x-ignore-shared", false)])) == nil {
            track.note("warning: could not turn x-ignore-shared off in the new QEMU; network migrations turn it off themselves")
        }
        old.cpuEnd = ProcessStats.cpuSeconds(pid: old.pid)
        self.old = old
        QEMU.stop(pid: old.pid, qmp: old.qmp, grace: .seconds(10))
        old.qmp.close()
        do {
            try store.adopt(name, pid: new.pid, qmpSocket: new.instance.qmpSocket, binary: options.qemuBinary)
        } catch {
            // The VM runs; only the record is behind. Say how to find it.
            track.note("warning: VM runs in QEMU pid \(new.pid) (QMP \(new.instance.qmpSocket)) but its record was not updated: \(error)")
        }
        try? FileManager.default.removeItem(atPath: paths.updateSocket)
        if let log = new.instance.log { _ = rename(log, paths.qemuLog) }
        self.new?.cpuSeconds = ProcessStats.cpuSeconds(pid: new.pid)
        new.qmp.close()
        try? move(to: .done)
    }

    /// Undoes a failed update: the new QEMU is stopped and confirmed gone, then the old
    /// one leaves the migration and runs again. Returns a note and whether the VM is safe
    /// (running, or paused as it was, in the old QEMU).
    private func rollBack(_ record: VMRecord) -> (String?, Bool) {
        var notes: [String] = []
        if let new {
            let gone = QEMU.stop(pid: new.pid, qmp: new.qmp, grace: .seconds(3))
            new.qmp.close()
            if !gone {
                // The new copy may still be there: resuming the old one could run the VM twice.
                return ("the new QEMU (pid \(new.pid)) does not exit; the old copy is left as it is (check both)", false)
            }
            notes.append("the new QEMU was stopped")
        }
        if let instance = newInstance {
            try? FileManager.default.removeItem(atPath: instance.qmpSocket)
            try? FileManager.default.removeItem(atPath: instance.pidFile)
            if let log = instance.log { _ = rename(log, record.paths.directory + "/qemu-update-failed.log") }
        }
        try? FileManager.default.removeItem(atPath: record.paths.updateSocket)
        var safe = true
        if let old {
            let (repair, ok) = old.takeBack(track, where: " in its old QEMU")
            _ = try? old.qmp.setMigrationCapabilities([("x-ignore-shared", false)])
            if let repair { notes.append(repair) }
            safe = ok
            old.qmp.close()
        }
        do {
            try store.setPhase(name, .running, from: .updating)
        } catch {
            notes.append("its record still says updating (\(error)); `ferry vm list` settles it")
        }
        return (notes.isEmpty ? nil : notes.joined(separator: "; "), safe)
    }

    private func report(_ outcome: MigrationReport.Outcome, error: String?, failedPhase: MigrationPhase? = nil) -> MigrationReport {
        let host = HostInfo.hostname
        var r = track.report(
            outcome, error: error, failedPhase: failedPhase,
            source: track.ferrySide(host: oldPID > 0 ? "\(host) (QEMU pid \(oldPID))" : host, qemuCPUSeconds: old?.cpuSeconds),
            destination: .init(host: (new?.pid ?? 0) > 0 ? "\(host) (QEMU \(new?.version ?? "?") pid \(new?.pid ?? 0))" : host,
                               ferryCPUSeconds: nil, qemuCPUSeconds: new?.cpuSeconds, ferryPeakRSSBytes: nil))
        r.streamBytes = track.journal.lastInfo?.transferredBytes ?? 0
        r.security = "none needed (same host, Unix socket in the VM's directory)"
        r.mode = Self.modeDescription
        return r
    }
}
