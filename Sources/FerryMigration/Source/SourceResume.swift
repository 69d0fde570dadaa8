import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation

// Resuming a postcopy migration whose session was lost with a daemon (protocol v7). Once
// the VM runs at the destination, each QEMU holds half of it: the session that carries the
// rest must not end with either daemon. When it does (the destination's `ferry serve`
// restarted and no longer knows it; this host's `ferry migrate` was killed), both QEMUs
// pause their migration (postcopy-paused) with their sockets closed, and a new session
// takes the rest on: the destination QEMU listens again (`migrate-recover`), this one
// connects to it with `migrate` and `resume`, and the destination asks again for the
// pages it still lacks.
extension SourceMigration {
    /// How long the resumes of one `ferry migrate` go on before it leaves the VM to
    /// `ferry serve` on this host (which keeps trying).
    static let resumeDeadline: Duration = .seconds(600)

    /// The handover record of a VM that committed into postcopy from this host.
    func postcopyHandover() -> HandoverRecord? {
        guard let h = store.handover(name), h.role == .source, h.decision == .commit, h.postcopy == true else { return nil }
        return h
    }

    /// `ferry migrate NAME` for a VM whose migration committed into postcopy and whose
    /// migration process is gone: resumes it to the destination that runs it (the one its
    /// record names; a different `--to` is refused). Never throws: the report says it.
    func runResume(_ handover: HandoverRecord) -> MigrationReport {
        let record: VMRecord
        let lock: VMLock
        do {
            record = try store.record(name)
            // `ferry serve`'s reconciler, which may have started this process, holds the
            // VM's lock until its pass ends.
            var held: VMLock?
            let started = Stopwatch()
            while held == nil {
                do {
                    held = try VMLock(paths: record.paths, name: name)
                } catch {
                    guard started.elapsed < 10 else { throw error }
                    usleep(100_000)
                }
            }
            lock = held!
        } catch {
            return report(.uncertain, error: "\(name) committed into postcopy to \(handover.peerHost) and cannot be resumed from here now: \(error)", spec: nil)
        }
        claimedPID = record.state.pid
        commitRecorded = true
        RunningMigrationFile.write(record.paths)
        defer {
            RunningMigrationFile.remove(record.paths)
            withExtendedLifetime(lock) {}
        }
        guard options.host == handover.peerHost else {
            return report(.uncertain, error: "\(name) committed into postcopy to \(handover.peerHost), which runs it and lacks pages only this host has: it can be resumed only there, not to \(options.host)", spec: record.spec)
        }
        guard record.alive else {
            return report(.uncertain, error: "\(name) committed into postcopy to \(handover.peerHost), but its QEMU here is gone, and with it the pages the destination lacked: the VM cannot be completed", spec: record.spec)
        }
        do {
            var qemu = try attachQEMU(record, duringPostcopy: true)
            let info = try qemuAccount(qemu.qmp)
            postcopy = PostcopyAccount(requestedAt: 0, reason: "the migration that switched was lost with its process; resumed", remainingBytes: info.remainingBytes)
            postcopy?.runningAt = 0
            track.note("\(name) committed into postcopy to \(handover.peerHost) (session \(handover.session.prefix(8))) and its migration process is gone: resuming it")
            if info.status == .completed {
                // It had every page there before its process went: only the source copy is left to stop.
                track.note("QEMU here had completed the migration: the destination has every page")
                stopSourceCopy(&qemu)
                postcopy?.completedAt = track.elapsed
                try? move(to: .connecting)
                return report(.succeeded, error: nil, spec: record.spec)
            }
            let (transport, link) = try resumeUntilCarried(record, qemu: qemu, original: handover.session)
            try finishResumingPostcopy(record, qemu: qemu, transport: transport, link: link, original: handover.session)
            finish(&qemu, transport: self.transport ?? transport, link: self.link ?? link)
            return report(.succeeded, error: nil, spec: record.spec)
        } catch {
            closeTransport()
            qemu?.qmp.close()
            return report(.uncertain, error: "postcopy could not be resumed: \(error). The VM runs on \(handover.peerHost) and waits for the pages this host's QEMU (pid \(record.state.pid)) holds; `ferry serve` on this host (or `ferry migrate \(name) --to \(handover.peerHost)`) resumes it", spec: record.spec)
        }
    }

    /// Postcopy to its end, resuming it in a new session each time its session is lost
    /// while QEMU here lives (``resumeDeadline`` at most).
    func finishResumingPostcopy(_ record: VMRecord, qemu: LocalQEMU, transport: SourceTransport, link: ControlLink,
                                original: String) throws(MigrateError) {
        var (transport, link) = (transport, link)
        while true {
            do {
                try finishPostcopy(transport, link: link, qmp: qemu.qmp)
                return
            } catch {
                guard ProcessStats.isAlive(pid: qemu.pid) else { throw error }
                if case .postcopy = error { throw error }
                track.note("postcopy's session failed (\(error)); resuming it in a new session")
                (transport, link) = try resumeUntilCarried(record, qemu: qemu, original: original)
            }
        }
    }

    /// Tries ``resumePostcopy`` until a session carries the migration again, waiting 1 s,
    /// 2 s, ... 10 s between tries; gives up on a refusal no retry would change (the
    /// destination's VM or QEMU is gone) or after ``resumeDeadline``.
    func resumeUntilCarried(_ record: VMRecord, qemu: LocalQEMU, original: String) throws(MigrateError) -> (SourceTransport, ControlLink) {
        let started = ContinuousClock.now
        var attempt = 0
        while true {
            do {
                return try resumePostcopy(record, qemu: qemu, original: original)
            } catch {
                attempt += 1
                if case .postcopy = error { throw error }
                if case .refused(.said(let said)) = error, said.code == .badOffer { throw error }
                guard ContinuousClock.now - started < Self.resumeDeadline else { throw error }
                let wait = Double(min(attempt, 10))
                track.note("resuming postcopy failed (\(error)); trying again in \(Int(wait)) s")
                Thread.sleep(forTimeInterval: wait)
            }
        }
    }

    /// One resume: the old session's transport closed (QEMU here pauses its migration), a
    /// new session offering the rest (``OfferMessage/resumeSession``), channels, and QEMU
    /// resumed into them.
    func resumePostcopy(_ record: VMRecord, qemu: LocalQEMU, original: String) throws(MigrateError) -> (SourceTransport, ControlLink) {
        closeTransport()
        transport = nil
        link = nil
        control = nil
        session = nil
        // What the old session's threads still report is not this one's (a stream's end,
        // its link lost), QEMU's own events aside.
        sessionGeneration.withLock { $0 += 1 }
        var kept: [Event] = []
        while let event = events.next(timeout: .zero) {
            if case .qemuStatus = event { kept.append(event) }
            if case .qemuStopped = event { kept.append(event) }
        }
        for event in kept { events.post(event) }
        try awaitSourcePause(qemu.qmp)
        let resumes = (postcopy?.resumedAt ?? []) + [track.elapsed]
        postcopy?.resumedAt = resumes
        let (control, welcome, security) = try connect()
        let session = try negotiate(control, welcome: welcome, security: security, spec: record.spec, resuming: original)
        let link = openControlLink(control, session)
        try startDestination(link)
        let transport = try openChannels(session, control: control, twoWay: true)
        let uri = try handStreams(to: qemu.qmp, transport: transport, plan: session.plan, paths: record.paths)
        do {
            try qemu.qmp.execute("migrate", arguments: ["uri": .string(uri), "resume": .bool(true)])
        } catch {
            throw .qemu(.command(doing: "resume the postcopy migration", error))
        }
        track.note("QEMU resumed its postcopy migration in session \(session.accept.session.prefix(8)) (main + preempt)")
        return (transport, link)
    }

    /// Waits until QEMU here has paused its postcopy migration (its sockets closed with the
    /// old session), asking it to (`migrate-pause`) if it still counts itself active after a
    /// second; 10 s at most.
    private func awaitSourcePause(_ qmp: QMPClient) throws(MigrateError) {
        let started = Stopwatch()
        var pauseAsked = false
        while true {
            let info = try qemuAccount(qmp)
            switch info.status {
            case .postcopyPaused:
                return
            case .postcopyActive, .postcopyRecover:
                if !pauseAsked && started.elapsed >= 1 {
                    pauseAsked = true
                    _ = try? qmp.execute("migrate-pause")
                }
            default:
                throw .postcopy("QEMU here is not in a postcopy migration that can be resumed (it says \(info.status))")
            }
            guard started.elapsed < 10 else {
                throw .postcopy("QEMU here did not pause its postcopy migration within 10 s (it says \(info.status))")
            }
            usleep(20_000)
        }
    }
}
