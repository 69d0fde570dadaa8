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
/// The switchover follows the network migration's rule: the new QEMU stays paused until
/// the old one has finished and sits in `postmigrate`; then the new one gets `cont`, and
/// only then does the old one quit. Any failure before `cont` stops the new QEMU (and
/// makes sure it is gone) before the old one is resumed, so the VM is never lost and never
/// runs twice.
public final class SameHostUpdate: @unchecked Sendable {
    /// The report's `mode` line.
    public static let modeDescription = "same-host update, memory kept in place (x-ignore-shared)"

    private let store: VMStore
    private let name: String
    private let options: UpdateOptions
    private let logger: Logger
    private let progress: @Sendable (MigrationProgress) -> Void
    private let clock = Stopwatch()
    private let startedAt = Date()
    private let ferryCPUStart = ProcessStats.ownCPUSeconds()
    private var reportEvents: [MigrationReport.Event] = []
    private var phase = MigrationPhase.preparing

    private var oldQMP: QMPClient?
    private var oldPID: Int32 = 0
    private var oldCPUStart: Double = 0
    private var oldCPUEnd: Double?
    private var newQMP: QMPClient?
    private var newPID: Int32 = 0
    private var newCPU: Double?
    private var instance: QEMUInstance?
    private var wasRunning = true
    private var migrateStarted = false
    private var migrateIssuedAt: Double?
    private var completedAt: Double?
    private var switchoverMillis: Double?
    private var lastInfo: MigrationInfo?
    private var newVersion = "?"
    private let stopAt = Locked<Double?>(nil)

    public init(store: VMStore, name: String, options: UpdateOptions, logger: Logger,
                progress: @escaping @Sendable (MigrationProgress) -> Void) {
        self.store = store
        self.name = name
        self.options = options
        self.logger = logger
        self.progress = progress
    }

    private func note(_ what: String) {
        reportEvents.append(.init(at: clock.elapsed, what: what))
        logger.info("\(what)", metadata: ["vm": "\(name)"])
    }

    /// Runs the update to its end. Never throws: the report says what happened.
    public func run() -> MigrationReport {
        let lock: VMLock
        let record: VMRecord
        do {
            (record, lock) = try store.claimRunning(name)
        } catch {
            return report(.failedVMOnSource, error: (error as? MigrationError)?.message ?? "\(error)")
        }
        _ = lock
        do {
            try update(record)
            return report(.succeeded, error: nil)
        } catch {
            let message = (error as? MigrationError)?.message ?? "\(error)"
            let failedPhase = phase
            note("failed during \(failedPhase.rawValue): \(message)")
            let (recovery, safe) = rollBack(record)
            var r = report(safe ? .failedVMOnSource : .uncertain, error: message + (recovery.map { "; " + $0 } ?? ""))
            r.failedPhase = failedPhase.rawValue
            return r
        }
    }

    private func update(_ record: VMRecord) throws {
        oldPID = record.state.pid
        oldCPUStart = ProcessStats.cpuSeconds(pid: oldPID) ?? 0
        let paths = record.paths
        guard VMStore.mapsMemory(pid: oldPID, file: paths.memoryFile) else {
            throw MigrationError(.preparing, "VM '\(name)' does not keep its RAM in \(paths.memoryFile) (it was started before Ferry "
                                 + "used a shared memory backend, or the file was removed), so a new QEMU could not take its memory over; "
                                 + "migrate it to another host, or stop it and run it again")
        }
        let old: QMPClient
        do {
            old = try QMPClient(path: paths.qmpSocket)
        } catch {
            throw MigrationError(.preparing, "cannot talk to the VM's QEMU: \(error)")
        }
        oldQMP = old
        old.eventHandler = { [stopAt] event in
            if event.name == "STOP" { stopAt.withLock { $0 = event.timestamp } }
        }
        wasRunning = try qmpCall(.preparing, "query the VM's QEMU") { try old.queryStatus() }.running
        let current = try qmpCall(.preparing, "query the VM's QEMU") { try old.queryMigrate() }
        if current.status.isInProgress {
            throw MigrationError(.preparing, "QEMU already has a migration in progress (\(current.status))")
        }
        // The successor: same spec, same RAM file, its own QMP socket and pid file, on
        // record before it starts, so that the update can be settled if this process dies
        // (the reconciler of `ferry vm list` and `ferry serve`).
        let tag = String(format: "%06x", UInt32.random(in: 0...0xFF_FFFF))
        try store.beginUpdate(name, UpdateInProgress(tag: tag, binary: options.qemuBinary, wasRunning: wasRunning))
        phase = .startingDestination
        emit()
        let instance = QEMUInstance.successor(paths, binary: options.qemuBinary, tag: tag)
        self.instance = instance
        let new: QMPClient
        do {
            (newPID, new) = try QEMU.launch(spec: record.spec, paths: paths, store: store.bootFiles, incoming: true, instance: instance)
        } catch {
            throw MigrationError(.startingDestination, "the new QEMU did not start: \(error)")
        }
        newQMP = new
        if let v = try? new.execute("query-version")["qemu"] {
            newVersion = [v["major"], v["minor"], v["micro"]].map { $0?.uint64.map(String.init) ?? "?" }.joined(separator: ".")
        }
        note("new QEMU \(newVersion) (\(options.qemuBinary), pid \(newPID)) waiting, RAM mapped from \(paths.memoryFile)")
        try? FileManager.default.removeItem(atPath: paths.updateSocket)
        try qmpCall(.startingDestination, "prepare the new QEMU") {
            try new.setMigrationCapabilities([("x-ignore-shared", true)])
            try new.execute("migrate-incoming", arguments: ["uri": .string("unix:\(paths.updateSocket)")])
        }

        // Old QEMU into new QEMU, device state only.
        phase = .transferring
        emit()
        try qmpCall(.transferring, "configure the VM's QEMU") {
            try old.setMigrationCapabilities([("x-ignore-shared", true), ("multifd", false), ("events", true)])
            try old.setMigrationParameters([
                "max-bandwidth": .number(100_000_000_000),
                "downtime-limit": .number(Double(options.downtimeLimit.milliseconds)),
            ])
        }
        migrateIssuedAt = clock.elapsed
        try qmpCall(.transferring, "start the migration") {
            try old.execute("migrate", arguments: ["uri": .string("unix:\(paths.updateSocket)")])
        }
        migrateStarted = true
        let deadline = clock.elapsed + options.timeout.seconds
        while true {
            let info = try qmpCall(.transferring, "follow the migration") { try old.queryMigrate() }
            lastInfo = info
            if info.status == .completed { break }
            if info.status == .failed {
                throw MigrationError(.transferring, "QEMU reports the migration failed: \(info.errorDescription ?? "no reason given")")
            }
            if [.cancelled, .cancelling].contains(info.status) {
                throw MigrationError(.transferring, "the migration was cancelled in QEMU")
            }
            if stopAt.current != nil { phase = .switchover }
            if !ProcessStats.isAlive(pid: newPID) {
                // A new QEMU that fails to load the device state dies just after the old
                // one paused the VM for it, perhaps before its STOP event came: the VM not
                // running in the old QEMU says the switchover had begun.
                if wasRunning, let state = try? old.queryStatus(), !state.running { phase = .switchover }
                try checkNewAlive()
            }
            if clock.elapsed > deadline { throw MigrationError(.transferring, "timed out after \(Int(options.timeout.seconds)) s") }
            usleep(1_000)
        }
        completedAt = clock.elapsed
        phase = .switchover
        note("old QEMU finished sending (\(Format.bytes(lastInfo?.transferredBytes ?? 0)), QEMU downtime "
             + "\(lastInfo?.downtimeMilliseconds.map(Format.millis) ?? "?"))")

        // The old QEMU must be done for good (postmigrate) before the new one may run.
        // QEMU reports the migration completed a moment before its run state leaves
        // finish-migrate for postmigrate: wait for that (2 s at most), not fail on it.
        var oldState = try qmpCall(.switchover, "query the VM's QEMU") { try old.queryStatus() }
        let settle = ContinuousClock.now + .seconds(2)
        while oldState.status == .finishMigrate && ContinuousClock.now < settle {
            usleep(2000)
            oldState = try qmpCall(.switchover, "query the VM's QEMU") { try old.queryStatus() }
        }
        guard oldState.status == .postmigrate else {
            throw MigrationError(.switchover, "the old QEMU is \(oldState.status) after the migration, not postmigrate")
        }
        while true {
            let info = try qmpCall(.switchover, "follow the new QEMU") { try new.queryMigrate() }
            if info.status == .completed { break }
            if info.status == .failed {
                throw MigrationError(.switchover, "the new QEMU could not load the VM: \(info.errorDescription ?? "no reason given")")
            }
            try checkNewAlive()
            if clock.elapsed > deadline { throw MigrationError(.switchover, "the new QEMU did not finish loading in time") }
            usleep(1_000)
        }
        let newState = try qmpCall(.switchover, "query the new QEMU") { try new.queryStatus() }
        guard !newState.running else {
            throw MigrationError(.switchover, "the new QEMU started the VM on its own (\(newState.status))")
        }

        // Switchover.
        phase = .committing
        FaultPoint.updateBeforeCont.pause()
        if wasRunning {
            try qmpCall(.committing, "start the VM in the new QEMU") { try new.execute("cont") }
        }
        FaultPoint.updateAfterCont.pause()
        let switched = Date().timeIntervalSince1970
        if let stop = stopAt.current { switchoverMillis = (switched - stop) * 1000 }
        note(wasRunning ? "VM runs in the new QEMU" : "VM is in the new QEMU (paused, as it was)")

        // Past this point the new QEMU holds the VM: the old one only quits.
        if (try? new.setMigrationCapabilities([("x-ignore-shared", false)])) == nil {
            note("warning: could not turn x-ignore-shared off in the new QEMU; network migrations turn it off themselves")
        }
        oldCPUEnd = ProcessStats.cpuSeconds(pid: oldPID)
        QEMU.stop(pid: oldPID, qmp: old, grace: .seconds(10))
        old.close()
        do {
            try store.adopt(name, pid: newPID, qmpSocket: instance.qmpSocket, binary: options.qemuBinary)
        } catch {
            // The VM runs; only the record is behind. Say how to find it.
            note("warning: VM runs in QEMU pid \(newPID) (QMP \(instance.qmpSocket)) but its record was not updated: \(error)")
        }
        try? FileManager.default.removeItem(atPath: paths.updateSocket)
        if let log = instance.log { _ = rename(log, paths.qemuLog) }
        newCPU = ProcessStats.cpuSeconds(pid: newPID)
        new.close()
        phase = .done
        emit()
    }

    private func checkNewAlive() throws {
        guard ProcessStats.isAlive(pid: newPID) else {
            throw MigrationError(phase, "the new QEMU (pid \(newPID)) exited")
        }
    }

    private func qmpCall<T>(_ phase: MigrationPhase, _ what: String, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch {
            throw MigrationError(phase, "cannot \(what): \(error)")
        }
    }

    /// Undoes a failed update: the new QEMU is stopped and confirmed gone, then the old
    /// one leaves the migration and runs again. Returns a note and whether the VM is safe
    /// (running, or paused as it was, in the old QEMU).
    private func rollBack(_ record: VMRecord) -> (String?, Bool) {
        var notes: [String] = []
        if newPID > 0 {
            let gone = QEMU.stop(pid: newPID, qmp: newQMP, grace: .seconds(3))
            newQMP?.close()
            if !gone {
                // The new copy may still be there: resuming the old one could run the VM twice.
                return ("the new QEMU (pid \(newPID)) does not exit; the old copy is left as it is (check both)", false)
            }
            notes.append("the new QEMU was stopped")
        }
        if let instance {
            try? FileManager.default.removeItem(atPath: instance.qmpSocket)
            try? FileManager.default.removeItem(atPath: instance.pidFile)
            if let log = instance.log { _ = rename(log, record.paths.directory + "/qemu-update-failed.log") }
        }
        try? FileManager.default.removeItem(atPath: record.paths.updateSocket)
        var safe = true
        if let old = oldQMP {
            if migrateStarted { old.cancelMigration(timeout: .seconds(15)) }
            _ = try? old.setMigrationCapabilities([("x-ignore-shared", false)])
            if let state = try? old.queryStatus(), !state.running, wasRunning {
                do {
                    try old.execute("cont")
                    notes.append("the VM was paused by the migration and runs again in its old QEMU")
                    note("VM resumed in the old QEMU")
                } catch {
                    notes.append("the VM is paused in its old QEMU and could not be resumed: \(error)")
                    safe = false
                }
            }
            old.close()
        }
        try? store.setPhase(name, .running, from: .updating)
        return (notes.isEmpty ? nil : notes.joined(separator: "; "), safe)
    }

    private func emit() {
        progress(MigrationProgress(phase: phase, elapsedSeconds: clock.elapsed, qemu: lastInfo, streamBytes: lastInfo?.transferredBytes ?? 0,
                                   bitsPerSecond: 0, channels: [], interfaceBitsPerSecond: [:], note: nil))
    }

    private func report(_ outcome: MigrationReport.Outcome, error: String?) -> MigrationReport {
        let transfer = completedAt.flatMap { end in migrateIssuedAt.map { end - $0 } }
        let bytes = lastInfo?.transferredBytes ?? 0
        let host = HostInfo.hostname
        return MigrationReport(
            vm: name, outcome: outcome, error: error, failedPhase: nil, startedAt: startedAt,
            totalSeconds: clock.elapsed, transferSeconds: transfer,
            qemuDowntimeMilliseconds: outcome == .succeeded ? lastInfo?.downtimeMilliseconds : nil,
            switchoverMilliseconds: outcome == .succeeded ? switchoverMillis : nil,
            qemuTransferredBytes: lastInfo?.transferredBytes,
            streamBytes: bytes, wireBytes: 0, retransmittedBytes: 0,
            throughputBitsPerSecond: nil, multifdChannels: 0, channels: [], nics: [],
            events: reportEvents, timeline: [],
            source: .init(host: oldPID > 0 ? "\(host) (QEMU pid \(oldPID))" : host, ferryCPUSeconds: ProcessStats.ownCPUSeconds() - ferryCPUStart,
                          qemuCPUSeconds: (oldCPUEnd ?? ProcessStats.cpuSeconds(pid: oldPID)).map { $0 - oldCPUStart },
                          ferryPeakRSSBytes: ProcessStats.peakRSSBytes(pid: getpid())),
            destination: .init(host: newPID > 0 ? "\(host) (QEMU \(newVersion) pid \(newPID))" : host,
                               ferryCPUSeconds: nil, qemuCPUSeconds: newCPU, ferryPeakRSSBytes: nil),
            security: "none needed (same host, Unix socket in the VM's directory)",
            compression: nil,
            mode: Self.modeDescription)
    }
}
