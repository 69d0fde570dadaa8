import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation

extension SourceMigration {
    /// Step: the switchover. Everything is at the destination and its QEMU holds the VM
    /// paused. A stop is granted up to the commit point and refused from it on; the
    /// decision is on disk before it leaves (docs/PROTOCOL.md, "Switchover and crashes"),
    /// and from then on the VM is the destination's, whatever crashes: a failure after
    /// this point is settled with the destination, never rolled back.
    func commit(_ session: NegotiatedSession, link: ControlLink) throws(MigrateError) {
        try move(to: .committing)
        try interrupt.passCommitPoint()
        FaultPoint.sourceBeforeCommit.pause()
        track.journal.switchover.commitStarted = Date().timeIntervalSince1970
        do {
            // Written at the guest's STOP (``stageCommit()``): only the rename and the
            // directory's fsync are left for the pause.
            try store.recordHandover(name, commitRecord(session), staged: stagedCommit.take())
        } catch {
            throw .commitNotRecorded((error as? VMError) ?? .io("\(error)"))
        }
        commitRecorded = true
        track.journal.switchover.commitRecorded = Date().timeIntervalSince1970
        FaultPoint.sourceAfterCommitRecord.pause()
        do {
            try link.send(.commit, CommitMessage())
        } catch {
            throw .commitUnconfirmed("cannot send the commit (\(error))")
        }
        track.journal.switchover.commitSent = Date().timeIntervalSince1970
        committed = try awaitCommitted()
        track.journal.switchover.committedReceived = Date().timeIntervalSince1970
        track.journal.guestResumed()
        if let times = committed?.times {
            track.journal.pause = SwitchoverAccount.make(source: track.journal.switchover, destination: times)
        }
        track.note("VM runs on \(session.welcome.host)" + (postcopy != nil ? "; its memory follows in postcopy" : ""))
        if postcopy != nil { postcopy?.runningAt = track.elapsed }
        FaultPoint.sourceAfterCommitted.pause()
    }

    func commitRecord(_ session: NegotiatedSession) -> HandoverRecord {
        HandoverRecord(session: session.accept.session, role: .source, decision: .commit, peerHost: options.host, peerPort: options.port,
                       postcopy: postcopy != nil)
    }

    /// The commit record, written beside its place while the last bytes cross the link
    /// (best effort: without it, ``commit(_:link:)`` writes it whole).
    func stageCommit() {
        guard let session, stagedCommit == nil else { return }
        stagedCommit = try? store.stageHandover(name, commitRecord(session))
    }

    /// The destination's answer to the commit: it runs the VM, or it could not.
    private func awaitCommitted() throws(MigrateError) -> CommittedMessage? {
        while true {
            takeLinkNotes()
            // A control connection that moves meanwhile takes up to the link timeout.
            guard let event = events.next(timeout: .seconds(30) + options.linkTimeout) else {
                throw .commitUnconfirmed("no answer to the commit within \(30 + Int(options.linkTimeout.seconds)) s; the source copy stays paused")
            }
            switch event {
            case .frame(let frame) where frame.type == .committed:
                return try? ControlCoding.decode(CommittedMessage.self, from: frame)
            case .frame(let frame) where frame.type == .error:
                // The destination refused to run it: it has discarded its copy.
                let message = (try? ControlCoding.decode(ErrorMessage.self, from: frame))
                    ?? ErrorMessage(code: .invalid, message: "error")
                throw .destinationCannotRun(message)
            case .controlLost(let why):
                throw .commitUnconfirmed("lost the destination after the commit (\(why)); the source copy stays paused")
            default:
                continue
            }
        }
    }

    /// Step: the source copy is stopped for good and forgotten here. Its RAM file goes
    /// first, so that its pages are freed by QEMU's exit rather than by Ferry's unlink.
    func finish(_ qemu: inout LocalQEMU, transport: SourceTransport, link: ControlLink) {
        stopSourceCopy(&qemu)
        transport.manager.stop()
        transport.dataPath.closeChannels()
        try? link.send(.status, StatusMessage(text: "source stopped"))
        link.close()
        try? move(to: .done)
    }

    /// The source copy stopped for good and its record archived, its RAM file first.
    func stopSourceCopy(_ qemu: inout LocalQEMU) {
        qemu.cpuEnd = ProcessStats.cpuSeconds(pid: qemu.pid)
        self.qemu = qemu
        store.releaseMemory(name)
        QEMU.stop(pid: qemu.pid, qmp: qemu.qmp, grace: .seconds(10))
        store.archiveAndRemove(name, reason: "migrated")
    }

    // MARK: Failure

    /// Undoes a failure before the commit point: the destination is told, QEMU's migration
    /// is cancelled and the VM runs here again. Returns what needed repair, and what the
    /// outcome is decided from.
    func rollBack(reason: String) -> (repair: String?, result: MigrationOutcome.Rollback) {
        stagedCommit.take()?.discard()
        // The mirrors first, while the link is up if it is: a forced cancel then ends at
        // once, before the destination, told to abort, drops their NBD connections.
        abandonDiskCopies()
        liftDiskWriteLimits()
        if let link {
            try? link.send(.abort, AbortMessage(reason: reason))
            // Out before the connection closes, if it is up (a moving one is not waited for).
            link.drain(timeout: .milliseconds(500))
        } else {
            try? control?.send(.abort, AbortMessage(reason: reason))
        }
        closeTransport()
        var repair: String?
        var safe = true
        if let qemu {
            (repair, safe) = qemu.takeBack(track, where: " on the source")
        }
        do {
            try store.setPhase(name, .running, from: .migratingOut)
        } catch {
            // The VM runs; its record lags. `ferry vm list` settles a VM left migrating out.
            track.note("warning: cannot record the VM as running again: \(error)")
        }
        let died = claimedPID > 0 && !ProcessStats.isAlive(pid: claimedPID)
        return (repair, .init(vmSafe: safe, qemuDied: died))
    }

    /// The commit is recorded but the destination's answer was lost: ask its daemon (the
    /// same questions the reconciler asks) for up to 20 s. It runs the VM: the source copy
    /// is stopped, success. It has no copy: the source copy resumes. No answer: the source
    /// copy stays paused and `ferry serve` on this host settles it when it can.
    func settleAfterCommit(_ why: String, spec: VMSpec) -> MigrationReport {
        track.note("\(why); settling the recorded commit with the destination")
        qemu?.qmp.close()  // QEMU's monitor takes one client at a time; the reconciler needs it
        let reconciler = Reconciler(store: store, keys: options.keys, logger: logger)
        let deadline = ContinuousClock.now + .seconds(20)
        var last = "no answer"
        while ContinuousClock.now < deadline {
            guard let record = try? store.record(name) else {
                track.note("the destination confirmed it runs the VM; the source copy is stopped")
                try? move(to: .done)
                return report(.succeeded, error: nil, spec: spec)
            }
            if store.handover(name) == nil && record.state.phase == .running {
                return report(.failedVMOnSource, error: "\(why); the destination has no copy, so the source copy runs again", spec: spec)
            }
            last = reconciler.settleSource(record, network: true) ?? last
            if (try? store.record(name)) != nil && store.handover(name) != nil { sleep(1) }
        }
        return report(.uncertain, error: "\(why); \(last). The source copy stays paused; `ferry serve` on this host settles it with the destination", spec: spec)
    }

    /// Closes the data channels, QEMU's stream sockets and the control connection.
    func closeTransport() {
        transport?.close(reason: "migration ended")
        link?.close()
        control?.shutdown()
    }
}
