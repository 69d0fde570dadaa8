import FerryQMP
import FerryVM
import FerryWire

/// The rules that settle what a crash left half-done (docs/PROTOCOL.md, "Switchover and
/// crashes"), as pure functions: facts in (what this host's records and QEMUs say, what
/// the peer's daemon says), a decision out (ask the peer, or actions and the note a user
/// reads). No I/O and no clock: ``Reconciler`` gathers the facts and carries out the
/// actions, and the rules are tested as a table without root
/// (Tests/FerryMigrationTests/ReconcileRulesTests.swift).
///
/// Over every rule: a copy whose peer may run the VM stays paused. A source copy resumes
/// only when no commit was recorded or the destination says `gone`; a destination copy
/// runs only with `committed` or the source's `commit`; this host answers `gone` only
/// once its copy is stopped or was never there. Actions run in order and the first that
/// fails ends the plan: each plan puts the step that marks the VM settled last, so a
/// failure leaves what the next pass (`ferry serve`: every 2 s) finds and tries again.
enum ReconcileRules {
    // MARK: Facts

    /// What this host's records and QEMUs say of one VM.
    struct VMFacts: Equatable, Sendable {
        var name: String
        var phase: VMPhase
        /// The VM's QEMU, and whether it lives (a QEMU of this VM has that pid).
        var pid: Int32
        var alive: Bool
        /// The migration session the VM runs by (``VMState/session``).
        var session: String? = nil
        /// A same-host update under way (phase `updating`).
        var update: UpdateInProgress? = nil
        /// What its QEMU says; nil if it was not asked (not alive, or not ours to ask).
        var qemu: QEMUView? = nil
        /// A same-host update's new QEMU, if a QEMU of this VM has the pid in its pid file.
        var successor: Successor? = nil
    }

    /// What a QEMU said over QMP, or why it could not be asked.
    enum QEMUView: Equatable, Sendable {
        case answered(RunState, MigrationStatus)
        case unreachable(String)
    }

    /// A same-host update's new QEMU that lives.
    struct Successor: Equatable, Sendable {
        var pid: Int32
        var qemu: QEMUView
    }

    /// What the peer's daemon said to ``Decision/ask(_:peerHost:peerPort:)``.
    enum PeerAnswer: Equatable, Sendable {
        case notAsked
        /// Not reached, or it answered nonsense.
        case unreachable
        case answered(ResolvedMessage)
    }

    /// Everything a pass knows of one VM.
    struct Facts: Equatable, Sendable {
        var vm: VMFacts
        var handover: HandoverRecord? = nil
        /// The handover record exists but cannot be read: it may be a `commit`, so
        /// nothing that depends on it is decided.
        var handoverUnreadable: String? = nil
        /// False for `ferry vm list`: nothing that needs the peer.
        var network: Bool
        var peer: PeerAnswer = .notAsked
    }

    // MARK: Decisions

    /// One step of a plan, carried out by the driver (``ReconcileHost/perform(_:on:)``).
    enum Action: Equatable, Sendable {
        /// Stops the VM's QEMU (quit, then signals) and removes the VM, its serial log kept
        /// under the archive reason (``VMStore/stop(_:reason:)``). Fails if QEMU does not exit.
        case discard(reason: String)
        /// Removes a VM whose QEMU is dead (``VMStore/archiveAndRemove(_:reason:)``).
        case archive(reason: String)
        /// Cancels the VM's QEMU's outgoing migration and waits until QEMU has left it.
        case cancelMigration
        /// `cont` on the VM's QEMU if it is paused.
        case resume
        /// Removes the handover record (durably).
        case clearHandover
        /// The VM's phase becomes `running`; with a session, the one it now runs by.
        case setRunning(session: String?)
        /// Writes this `committed` record (durably) before the destination copy runs.
        case recordCommitted(HandoverRecord)
        /// Stops the VM's (old) QEMU, pid given, leaving the VM's record alone.
        case stopQEMU(pid: Int32)
        /// Stops an update's new QEMU.
        case stopSuccessor(pid: Int32, UpdateInProgress)
        /// `cont` on an update's new QEMU.
        case resumeSuccessor(UpdateInProgress)
        /// The update's new QEMU becomes the VM's (``VMStore/adopt(_:pid:qmpSocket:binary:)``),
        /// its start-up log the VM's qemu.log.
        case adoptSuccessor(pid: Int32, UpdateInProgress)
        /// Removes the socket the old QEMU migrated into during an update.
        case removeUpdateSocket
        /// Starts `ferry migrate` to resume the VM's postcopy migration to `host` (its
        /// process died with both QEMUs paused): ``SourceMigration`` resumes it in a new
        /// session, in a process of its own.
        case resumePostcopy(host: String, port: UInt16)
        /// Removes the QMP socket of an update's new QEMU that is gone.
        case removeSuccessorSocket(UpdateInProgress)

        /// The step, as a note says it failed ("…, but stopping its QEMU failed: …").
        var what: String {
            switch self {
            case .discard: "stopping its QEMU"
            case .archive: "removing its record"
            case .cancelMigration: "cancelling its QEMU's migration"
            case .resume: "resuming it (cont)"
            case .clearHandover: "clearing its handover record"
            case .setRunning: "recording it as running"
            case .recordCommitted: "recording committed"
            case .stopQEMU(let pid): "stopping the old QEMU (pid \(pid))"
            case .stopSuccessor(let pid, _): "stopping the new QEMU (pid \(pid))"
            case .resumeSuccessor: "resuming the new QEMU (cont)"
            case .adoptSuccessor(let pid, _): "recording the new QEMU (pid \(pid)) as the VM's"
            case .removeUpdateSocket: "removing the update's socket"
            case .removeSuccessorSocket: "removing the new QEMU's socket"
            case .resumePostcopy: "starting ferry migrate to resume it"
            }
        }
    }

    /// Actions, and the note line: `situation` (what the pass found) followed by
    /// `outcome` when every action was carried out, or by which one failed and why.
    struct Plan: Equatable, Sendable {
        var actions: [Action]
        /// Nil: nothing to say (and nothing to do).
        var situation: String?
        var outcome = ""

        static let nothing = Plan(actions: [], situation: nil)

        /// The note once every action was carried out.
        var note: String? { situation.map { $0 + outcome } }

        /// The note when `action` failed: the actions after it were not carried out.
        func note(failed action: Action, why: String) -> String {
            (situation ?? "") + retry(action.what, why)
        }
    }

    enum Decision: Equatable, Sendable {
        /// Ask the peer's daemon, then decide again with its answer in ``Facts/peer``.
        case ask(ResolveMessage, peerHost: String, peerPort: UInt16)
        case act(Plan)
    }

    /// How a note ends when a step failed.
    static func retry(_ what: String, _ why: String) -> String {
        ", but \(what) failed: \(why); tried again on the next pass"
    }

    // MARK: Source: a VM migrating out whose migration process is gone

    static func source(_ f: Facts) -> Decision {
        let name = f.vm.name
        if let plan = unreadable(f) { return .act(plan) }
        guard let h = f.handover, h.role == .source, h.decision == .commit else { return .act(rollBack(f)) }
        if h.postcopy == true && f.vm.alive {
            // Committed into postcopy: the VM runs at the destination and faults in pages
            // from this QEMU until its migration completes. Stopping it would lose the VM;
            // running it would run the VM twice. It stays as it is.
            var status: MigrationStatus?
            if case .answered(_, let said)? = f.vm.qemu { status = said }
            if status == .postcopyPaused && f.network {
                // Its migration process died and QEMU paused the migration: a new session
                // takes the rest on (the destination's QEMU paused too).
                return .act(Plan(actions: [.resumePostcopy(host: h.peerHost, port: h.peerPort)],
                                 situation: "\(name): committed into postcopy to \(h.peerHost), whose QEMU still needs pages from this host's (pid \(f.vm.pid)); its migration process is gone",
                                 outcome: ": ferry migrate resumes it in a new session"))
            }
            if status != .completed {
                return .act(Plan(actions: [], situation: "\(name): committed into postcopy; the VM runs on \(h.peerHost) and still needs pages from this host's QEMU (pid \(f.vm.pid)), which is left as it is: neither stopped nor resumed"))
            }
        }
        guard f.network else {
            return .act(Plan(actions: [], situation: "\(name): commit recorded; waiting for ferry serve to settle it with \(h.peerHost)"))
        }
        let answer: ResolvedMessage
        switch f.peer {
        case .notAsked:
            return .ask(ResolveMessage(session: h.session, vm: name, decision: .commit), peerHost: h.peerHost, peerPort: h.peerPort)
        case .unreachable:
            return .act(stillPaused(name, h, detail: "unreachable"))
        case .answered(let a):
            answer = a
        }
        switch answer.state {
        case .running:
            return .act(Plan(actions: [.discard(reason: "migrated")],
                             situation: "\(name): the migration to \(h.peerHost) had committed; the VM runs there",
                             outcome: ", the source copy is stopped"))
        case .gone:
            // The destination has no copy and never will: the source copy is the only one.
            let situation = "\(name): committed, but \(h.peerHost) has no copy (\(answer.detail))"
            guard f.vm.alive else {
                return .act(Plan(actions: [.archive(reason: "died")], situation: situation,
                                 outcome: "; its QEMU died too (pid \(f.vm.pid)): nothing of it runs here"))
            }
            guard let back = takeBack(f.vm, resume: { _ in true }) else {
                return .act(Plan(actions: [], situation: situation, outcome: retry("asking its QEMU", unknown(f.vm.qemu) ?? "")))
            }
            return .act(Plan(actions: back.actions + [.clearHandover, .setRunning(session: nil)],
                             situation: situation, outcome: "; the source copy runs again"))
        case .pending, .commit, .abort:
            return .act(stillPaused(name, h, detail: answer.detail))
        }
    }

    private static func stillPaused(_ name: String, _ h: HandoverRecord, detail: String) -> Plan {
        Plan(actions: [], situation: "\(name): commit recorded; \(h.peerHost) did not answer (\(detail)), the source copy stays paused")
    }

    /// No commit was recorded and the migration process is gone: the VM stays here.
    private static func rollBack(_ f: Facts) -> Plan {
        let name = f.vm.name
        guard f.vm.alive else {
            return Plan(actions: [.archive(reason: "died")],
                        situation: "\(name): its QEMU died during a migration (pid \(f.vm.pid))",
                        outcome: "; nothing of it runs here")
        }
        let situation = "\(name): the migration never committed; the VM stays here"
        guard let back = takeBack(f.vm, resume: { $0.status.isPausedByMigration || $0.status == .paused }) else {
            return Plan(actions: [], situation: situation, outcome: retry("asking its QEMU", unknown(f.vm.qemu) ?? ""))
        }
        let clear: [Action] = f.handover == nil ? [] : [.clearHandover]
        return Plan(actions: back.actions + clear + [.setRunning(session: nil)], situation: situation,
                    outcome: back.phrases.map { ", " + $0 }.joined())
    }

    /// Why a QEMU's state is unknown; nil if it answered.
    static func unknown(_ view: QEMUView?) -> String? {
        switch view {
        case .answered?: nil
        case .unreachable(let why)?: why
        case nil: "it was not asked"
        }
    }

    /// The steps that give the guest back to the VM's QEMU: its migration cancelled if one
    /// is under way, `cont` if it is paused and `resume` says so of its state; with the
    /// phrases of a note. Nil if QEMU's state is unknown.
    static func takeBack(_ vm: VMFacts, resume: (RunState) -> Bool) -> (actions: [Action], phrases: [String])? {
        guard case .answered(let run, let migration)? = vm.qemu else { return nil }
        var actions: [Action] = []
        var phrases: [String] = []
        if migration.isInProgress {
            actions.append(.cancelMigration)
            phrases.append("its QEMU's migration cancelled")
        }
        if !run.running && resume(run) {
            actions.append(.resume)
            phrases.append("resumed")
        }
        return (actions, phrases)
    }

    /// A handover record that exists but cannot be read: nothing is decided.
    private static func unreadable(_ f: Facts) -> Plan? {
        guard let why = f.handoverUnreadable else { return nil }
        return Plan(actions: [], situation: "\(f.vm.name): its handover record cannot be read (\(why))",
                    outcome: "; nothing is decided without it, tried again on the next pass")
    }

    // MARK: Destination: an incoming VM that no session of this daemon is receiving

    static func destination(_ f: Facts) -> Decision {
        let name = f.vm.name
        if let plan = unreadable(f) { return .act(plan) }
        guard let h = f.handover, h.role == .destination else {
            // Without the daemon's view of its live sessions, a VM being received now
            // looks the same: only `ferry serve` discards these.
            guard f.network else { return .act(.nothing) }
            return .act(Plan(actions: [.discard(reason: "incoming-stale")],
                             situation: "\(name): a half-received VM (never loaded)", outcome: " was discarded"))
        }
        guard f.vm.alive else {
            return .act(Plan(actions: [.clearHandover, .discard(reason: "incoming-died")],
                             situation: "\(name): its destination QEMU died before it ran", outcome: "; nothing of it runs here"))
        }
        switch h.decision {
        case .committed:
            return .act(commit(f.vm, h, situation: "\(name): committed before the crash", outcome: "; it runs here"))
        case .prepared:
            guard f.network else {
                return .act(Plan(actions: [], situation: "\(name): loaded and paused; waiting for \(h.peerHost)'s decision"))
            }
            switch f.peer {
            case .notAsked:
                return .ask(ResolveMessage(session: h.session, vm: name, decision: nil), peerHost: h.peerHost, peerPort: h.peerPort)
            case .answered(let a) where a.state == .commit:
                return .act(commit(f.vm, h, situation: "\(name): \(h.peerHost) had committed", outcome: "; the VM runs here"))
            case .answered(let a) where a.state == .abort:
                return .act(Plan(actions: [.discard(reason: "incoming-aborted")],
                                 situation: "\(name): \(h.peerHost) never committed", outcome: "; the paused copy here is discarded"))
            case .answered(let a):
                return .act(undecided(name, h, detail: a.detail))
            case .unreachable:
                return .act(undecided(name, h, detail: "unreachable"))
            }
        case .commit:
            return .act(.nothing)  // not a destination's decision
        }
    }

    private static func undecided(_ name: String, _ h: HandoverRecord, detail: String) -> Plan {
        Plan(actions: [], situation: "\(name): loaded and paused; \(h.peerHost) has not decided (\(detail))")
    }

    /// Runs the destination copy: `committed` recorded first (unless it is), then `cont`,
    /// then the VM's phase, then the record cleared. QEMU's state unknown: the record is
    /// written and the rest is left for the next pass.
    static func commit(_ vm: VMFacts, _ h: HandoverRecord, situation: String, outcome: String) -> Plan {
        var committed = h
        committed.decision = .committed
        let record: [Action] = h.decision == .committed ? [] : [.recordCommitted(committed)]
        guard case .answered(let run, _)? = vm.qemu else {
            return Plan(actions: record, situation: situation, outcome: retry("asking its QEMU", unknown(vm.qemu) ?? ""))
        }
        let resume: [Action] = run.running ? [] : [.resume]
        return Plan(actions: record + resume + [.setRunning(session: h.session), .clearHandover],
                    situation: situation, outcome: outcome)
    }

    // MARK: Same-host update whose `ferry vm update` is gone

    /// Both QEMUs map the same RAM, so exactly one may ever run the guest:
    /// - the new QEMU runs it (`cont` was given): the update had switched; the old QEMU
    ///   quits and the new one is adopted;
    /// - the old QEMU lives: the update is undone; the new QEMU (which never ran the
    ///   guest) quits, the old one's migration is cancelled and it runs again if it ran;
    /// - only the new QEMU lives and it has loaded the whole VM: the old one died after
    ///   sending it; the new one is adopted and runs it if the guest ran;
    /// - neither holds the VM: its QEMU died; nothing of it runs.
    /// A QEMU that cannot be asked decides nothing: stopping the wrong one would run the
    /// guest's RAM with the other's stale devices.
    static func update(_ f: Facts) -> Plan {
        let vm = f.vm
        guard let update = vm.update else {
            // Phase without the record (an older Ferry): the old QEMU is all there is.
            return Plan(actions: [.setRunning(session: nil)], situation: "\(vm.name): an update was interrupted",
                        outcome: "; the VM stays in its QEMU (pid \(vm.pid))")
        }
        if let new = vm.successor {
            let situation = "\(vm.name): an update was interrupted"
            guard case .answered(let run, let migration) = new.qemu else {
                return Plan(actions: [], situation: situation, outcome: retry("asking its new QEMU (pid \(new.pid))", unknown(new.qemu) ?? ""))
            }
            if run.running || (!vm.alive && migration == .completed) {
                let stopOld: [Action] = vm.alive ? [.stopQEMU(pid: vm.pid)] : []
                let resume: [Action] = !run.running && update.wasRunning ? [.resumeSuccessor(update)] : []
                return Plan(actions: [.removeUpdateSocket] + stopOld + resume + [.adoptSuccessor(pid: new.pid, update)],
                            situation: situation + " after its switchover",
                            outcome: "; the VM runs in the new QEMU (pid \(new.pid))" + (vm.alive ? ", the old one is stopped" : ""))
            }
        }
        let stopNew: [Action] = vm.successor.map { [.stopSuccessor(pid: $0.pid, update)] } ?? []
        let cleanUp: [Action] = [.removeUpdateSocket] + stopNew + [.removeSuccessorSocket(update)]
        guard vm.alive else {
            return Plan(actions: cleanUp + [.archive(reason: "died")], situation: "\(vm.name): its QEMU died during an update (pid \(vm.pid))",
                        outcome: "; nothing of it runs here")
        }
        let situation = "\(vm.name): an update was interrupted before its switchover"
        guard let back = takeBack(vm, resume: { _ in update.wasRunning }) else {
            return Plan(actions: [], situation: situation, outcome: retry("asking its QEMU", unknown(vm.qemu) ?? ""))
        }
        return Plan(actions: cleanUp + back.actions + [.setRunning(session: nil)], situation: situation,
                    outcome: "; the VM stays in its QEMU (pid \(vm.pid))" + back.phrases.map { ", " + $0 }.joined())
    }

    // MARK: A VM that runs here

    /// A `committed` record of the session the VM runs by is settled (clearing it failed
    /// after the VM ran): it is cleared. Any other record is left alone.
    static func running(_ f: Facts) -> Plan {
        guard let h = f.handover, h.role == .destination, h.decision == .committed, h.session == f.vm.session else {
            return .nothing
        }
        return Plan(actions: [.clearHandover], situation: "\(f.vm.name): runs here by session \(h.session)",
                    outcome: "; its settled handover record is cleared")
    }
}
