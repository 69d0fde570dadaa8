@testable import FerryMigration
import FerryQMP
import FerryVM
import FerryWire
import Foundation
import Testing

typealias Rules = ReconcileRules

/// The facts the tables are made of: one VM `vm1` (its QEMU pid 100, an update's new QEMU
/// pid 200), session `s1`, migrating from host `a` to host `b`.
enum Fixture {
    static let at = Date(timeIntervalSince1970: 1_700_000_000)
    static let commit = HandoverRecord(session: "s1", role: .source, decision: .commit, peerHost: "b", peerPort: 7470, at: at)
    static let prepared = HandoverRecord(session: "s1", role: .destination, decision: .prepared, peerHost: "a", peerPort: 7470, at: at)
    static let committed = with(prepared) { $0.decision = .committed }
    static let update = UpdateInProgress(tag: "t1", binary: "/usr/bin/qemu-system-x86_64", wasRunning: true)

    // What a QEMU says.
    static let running = Rules.QEMUView.answered(RunState(status: .running, running: true), .none)
    static let migrating = Rules.QEMUView.answered(RunState(status: .running, running: true), .active)
    static let stopAndCopy = Rules.QEMUView.answered(RunState(status: .finishMigrate, running: false), .active)
    static let postmigrate = Rules.QEMUView.answered(RunState(status: .postmigrate, running: false), .completed)
    static let paused = Rules.QEMUView.answered(RunState(status: .paused, running: false), .none)
    static let shutdown = Rules.QEMUView.answered(RunState(status: .shutdown, running: false), .none)
    /// A destination (or an update's new QEMU) that has loaded the whole VM, paused by `-S`.
    static let loaded = Rules.QEMUView.answered(RunState(status: .prelaunch, running: false), .completed)
    static let loading = Rules.QEMUView.answered(RunState(status: .inmigrate, running: false), .active)
    static let ranAfterLoad = Rules.QEMUView.answered(RunState(status: .running, running: true), .completed)
    static let busy = Rules.QEMUView.unreachable("QMP busy")
    /// A source QEMU in postcopy: sending, or paused with its streams closed.
    static let postcopyActive = Rules.QEMUView.answered(RunState(status: .postmigrate, running: false), .postcopyActive)
    static let postcopyPaused = Rules.QEMUView.answered(RunState(status: .postmigrate, running: false), .postcopyPaused)
    static let postcopyCommit = with(commit) { $0.postcopy = true }
    static let views = [running, migrating, stopAndCopy, postmigrate, paused, shutdown, loaded, loading, ranAfterLoad, busy]

    static func vm(_ phase: VMPhase, alive: Bool = true, qemu: Rules.QEMUView? = nil, session: String? = nil,
                   update: UpdateInProgress? = nil, successor: Rules.QEMUView? = nil) -> Rules.VMFacts {
        Rules.VMFacts(name: "vm1", phase: phase, pid: 100, alive: alive, session: session, update: update,
                      qemu: alive ? qemu : nil, successor: successor.map { Rules.Successor(pid: 200, qemu: $0) })
    }

    static func facts(_ vm: Rules.VMFacts, _ handover: HandoverRecord? = nil, network: Bool = true,
                      peer: Rules.PeerAnswer = .notAsked, unreadable: String? = nil) -> Rules.Facts {
        Rules.Facts(vm: vm, handover: handover, handoverUnreadable: unreadable, network: network, peer: peer)
    }

    static func says(_ state: ResolvedMessage.State, _ detail: String = "detail") -> Rules.PeerAnswer {
        .answered(ResolvedMessage(state: state, detail: detail))
    }

    static func with<T>(_ value: T, _ change: (inout T) -> Void) -> T {
        var copy = value
        change(&copy)
        return copy
    }
}

/// One row: facts in; either the question for the peer, or the exact actions and the words
/// the note must contain (none: no note at all).
struct Row: Sendable, CustomTestStringConvertible {
    var testDescription: String
    var facts: Rules.Facts
    var ask: ResolveMessage? = nil
    var actions: [Rules.Action] = []
    var note: [String] = []

    init(_ what: String, _ facts: Rules.Facts, ask: ResolveMessage) {
        testDescription = what
        self.facts = facts
        self.ask = ask
    }

    init(_ what: String, _ facts: Rules.Facts, _ actions: [Rules.Action], note: [String]) {
        testDescription = what
        self.facts = facts
        self.actions = actions
        self.note = note
    }

    func check(_ decision: Rules.Decision) {
        if let ask {
            let peer = facts.handover.map { ($0.peerHost, $0.peerPort) } ?? ("", 0)
            #expect(decision == .ask(ask, peerHost: peer.0, peerPort: peer.1))
            return
        }
        guard case .act(let plan) = decision else {
            Issue.record("asked the peer: \(decision)")
            return
        }
        #expect(plan.actions == actions)
        guard !note.isEmpty else {
            #expect(plan.note == nil)
            return
        }
        let text = plan.note ?? ""
        #expect(text.hasPrefix("vm1: "), "\(text)")
        for word in note { #expect(text.contains(word), "note lacks \"\(word)\": \(text)") }
    }
}

@Suite("Reconciliation rules: facts in, actions and note out")
struct ReconcileRulesTests {
    typealias F = Fixture

    static let sourceRows: [Row] = [
        // No commit record: the migration never committed, the VM stays here.
        Row("no commit, precopy under way: cancelled, not resumed (it runs)", F.facts(F.vm(.migratingOut, qemu: F.migrating)),
            [.cancelMigration, .setRunning(session: nil)], note: ["the migration never committed; the VM stays here", "its QEMU's migration cancelled"]),
        Row("no commit, in stop-and-copy: cancelled and resumed", F.facts(F.vm(.migratingOut, qemu: F.stopAndCopy)),
            [.cancelMigration, .resume, .setRunning(session: nil)], note: ["migration cancelled", ", resumed"]),
        Row("no commit, postmigrate: resumed", F.facts(F.vm(.migratingOut, qemu: F.postmigrate)),
            [.resume, .setRunning(session: nil)], note: ["never committed", ", resumed"]),
        Row("no commit, paused: resumed", F.facts(F.vm(.migratingOut, qemu: F.paused)),
            [.resume, .setRunning(session: nil)], note: ["resumed"]),
        Row("no commit, running: only its phase", F.facts(F.vm(.migratingOut, qemu: F.running)),
            [.setRunning(session: nil)], note: ["the VM stays here"]),
        Row("no commit, shut down: not resumed", F.facts(F.vm(.migratingOut, qemu: F.shutdown)),
            [.setRunning(session: nil)], note: ["the VM stays here"]),
        Row("no commit, without the network: the same (no peer needed)", F.facts(F.vm(.migratingOut, qemu: F.postmigrate), network: false),
            [.resume, .setRunning(session: nil)], note: ["never committed", "resumed"]),
        Row("no commit, a stray destination record: cleared", F.facts(F.vm(.migratingOut, qemu: F.running), F.prepared),
            [.clearHandover, .setRunning(session: nil)], note: ["never committed"]),
        Row("no commit, QEMU not answering: nothing, tried again", F.facts(F.vm(.migratingOut, qemu: F.busy)),
            [], note: ["never committed", "but asking its QEMU failed: QMP busy; tried again on the next pass"]),
        Row("no commit, its QEMU died: removed", F.facts(F.vm(.migratingOut, alive: false)),
            [.archive(reason: "died")], note: ["its QEMU died during a migration (pid 100)", "nothing of it runs here"]),
        // A commit record: only the destination's answer decides.
        Row("commit, without the network: waits", F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit, network: false),
            [], note: ["commit recorded; waiting for ferry serve to settle it with b"]),
        Row("commit: asks the destination", F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit),
            ask: ResolveMessage(session: "s1", vm: "vm1", decision: .commit)),
        Row("commit, it runs there: the source copy is stopped",
            F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit, peer: F.says(.running)),
            [.discard(reason: "migrated")], note: ["the migration to b had committed; the VM runs there", "the source copy is stopped"]),
        Row("commit, it runs there, the source QEMU died: removed the same way",
            F.facts(F.vm(.migratingOut, alive: false), F.commit, peer: F.says(.running)),
            [.discard(reason: "migrated")], note: ["the source copy is stopped"]),
        Row("commit, gone there: the source copy runs again",
            F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit, peer: F.says(.gone, "its QEMU died")),
            [.resume, .clearHandover, .setRunning(session: nil)], note: ["committed, but b has no copy (its QEMU died)", "the source copy runs again"]),
        Row("commit, gone there, QEMU not answering: nothing, tried again",
            F.facts(F.vm(.migratingOut, qemu: F.busy), F.commit, peer: F.says(.gone)),
            [], note: ["has no copy", "asking its QEMU failed: QMP busy; tried again"]),
        Row("commit, gone there, the source QEMU died too: nothing runs",
            F.facts(F.vm(.migratingOut, alive: false), F.commit, peer: F.says(.gone)),
            [.archive(reason: "died")], note: ["has no copy", "its QEMU died too (pid 100)", "nothing of it runs here"]),
        Row("commit, pending there: stays paused",
            F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit, peer: F.says(.pending, "a session here still handles it")),
            [], note: ["b did not answer (a session here still handles it)", "the source copy stays paused"]),
        Row("commit, unreachable: stays paused", F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit, peer: .unreachable),
            [], note: ["did not answer (unreachable)", "stays paused"]),
        Row("commit, a destination answering abort (nonsense): stays paused",
            F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit, peer: F.says(.abort)),
            [], note: ["stays paused"]),
        Row("commit, a destination answering commit (nonsense): stays paused",
            F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit, peer: F.says(.commit)),
            [], note: ["stays paused"]),
        // Committed into postcopy: both QEMUs hold half the VM until it completes.
        Row("postcopy, QEMU paused its migration: resumed by ferry migrate, never stopped nor run",
            F.facts(F.vm(.migratingOut, qemu: F.postcopyPaused), F.postcopyCommit),
            [.resumePostcopy(host: "b", port: 7470)], note: ["committed into postcopy to b", "ferry migrate resumes it in a new session"]),
        Row("postcopy, QEMU paused, without the network: left as it is",
            F.facts(F.vm(.migratingOut, qemu: F.postcopyPaused), F.postcopyCommit, network: false),
            [], note: ["neither stopped nor resumed"]),
        Row("postcopy, still active (its streams not yet closed): left as it is, the peer not asked",
            F.facts(F.vm(.migratingOut, qemu: F.postcopyActive), F.postcopyCommit),
            [], note: ["still needs pages from this host's QEMU (pid 100)", "neither stopped nor resumed"]),
        Row("postcopy, QEMU not answering: left as it is",
            F.facts(F.vm(.migratingOut, qemu: F.busy), F.postcopyCommit),
            [], note: ["neither stopped nor resumed"]),
        Row("postcopy, completed: settled as any commit (the destination asked)",
            F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.postcopyCommit),
            ask: ResolveMessage(session: "s1", vm: "vm1", decision: .commit)),
        Row("an unreadable handover record: nothing", F.facts(F.vm(.migratingOut, qemu: F.postmigrate), unreadable: "bad JSON"),
            [], note: ["its handover record cannot be read (bad JSON)", "tried again on the next pass"]),
    ]

    @Test("a VM migrating out whose migration process is gone", arguments: sourceRows)
    func source(_ row: Row) { row.check(Rules.source(row.facts)) }

    static let destinationRows: [Row] = [
        Row("no record: discarded (never loaded)", F.facts(F.vm(.incoming, qemu: F.loading)),
            [.discard(reason: "incoming-stale")], note: ["a half-received VM (never loaded) was discarded"]),
        Row("no record, without the network: left to ferry serve", F.facts(F.vm(.incoming, qemu: F.loading), network: false),
            [], note: []),
        Row("a source's record on an incoming VM counts as none", F.facts(F.vm(.incoming, qemu: F.loading), F.commit),
            [.discard(reason: "incoming-stale")], note: ["never loaded"]),
        Row("prepared, its QEMU died", F.facts(F.vm(.incoming, alive: false), F.prepared),
            [.clearHandover, .discard(reason: "incoming-died")], note: ["its destination QEMU died before it ran", "nothing of it runs here"]),
        Row("committed, its QEMU died", F.facts(F.vm(.incoming, alive: false), F.committed),
            [.clearHandover, .discard(reason: "incoming-died")], note: ["died before it ran"]),
        Row("committed, paused: it runs here", F.facts(F.vm(.incoming, qemu: F.loaded), F.committed),
            [.resume, .setRunning(session: "s1"), .clearHandover], note: ["committed before the crash; it runs here"]),
        Row("committed, already running: the records only", F.facts(F.vm(.incoming, qemu: F.ranAfterLoad), F.committed),
            [.setRunning(session: "s1"), .clearHandover], note: ["committed before the crash; it runs here"]),
        Row("committed, without the network: the same (no peer needed)", F.facts(F.vm(.incoming, qemu: F.loaded), F.committed, network: false),
            [.resume, .setRunning(session: "s1"), .clearHandover], note: ["it runs here"]),
        Row("committed, QEMU not answering: nothing, tried again", F.facts(F.vm(.incoming, qemu: F.busy), F.committed),
            [], note: ["committed before the crash", "asking its QEMU failed: QMP busy; tried again"]),
        Row("prepared, without the network: waits", F.facts(F.vm(.incoming, qemu: F.loaded), F.prepared, network: false),
            [], note: ["loaded and paused; waiting for a's decision"]),
        Row("prepared: asks the source", F.facts(F.vm(.incoming, qemu: F.loaded), F.prepared),
            ask: ResolveMessage(session: "s1", vm: "vm1", decision: nil)),
        Row("prepared, the source committed: committed recorded, then it runs",
            F.facts(F.vm(.incoming, qemu: F.loaded), F.prepared, peer: F.says(.commit)),
            [.recordCommitted(F.committed), .resume, .setRunning(session: "s1"), .clearHandover], note: ["a had committed; the VM runs here"]),
        Row("prepared, the source committed, QEMU not answering: recorded, the rest tried again",
            F.facts(F.vm(.incoming, qemu: F.busy), F.prepared, peer: F.says(.commit)),
            [.recordCommitted(F.committed)], note: ["a had committed", "asking its QEMU failed"]),
        Row("prepared, the source never committed: discarded", F.facts(F.vm(.incoming, qemu: F.loaded), F.prepared, peer: F.says(.abort)),
            [.discard(reason: "incoming-aborted")], note: ["a never committed; the paused copy here is discarded"]),
        Row("prepared, the source's migration still runs: waits",
            F.facts(F.vm(.incoming, qemu: F.loaded), F.prepared, peer: F.says(.pending, "still running")),
            [], note: ["loaded and paused; a has not decided (still running)"]),
        Row("prepared, unreachable: waits", F.facts(F.vm(.incoming, qemu: F.loaded), F.prepared, peer: .unreachable),
            [], note: ["has not decided (unreachable)"]),
        Row("prepared, a source answering gone (nonsense): waits", F.facts(F.vm(.incoming, qemu: F.loaded), F.prepared, peer: F.says(.gone)),
            [], note: ["has not decided"]),
        Row("prepared, a source answering running (nonsense): waits", F.facts(F.vm(.incoming, qemu: F.loaded), F.prepared, peer: F.says(.running)),
            [], note: ["has not decided"]),
        Row("a commit decision on a destination record (not a destination's): nothing",
            F.facts(F.vm(.incoming, qemu: F.loaded), F.with(F.prepared) { $0.decision = .commit }), [], note: []),
        Row("an unreadable handover record: nothing", F.facts(F.vm(.incoming, qemu: F.loaded), unreadable: "bad JSON"),
            [], note: ["cannot be read (bad JSON)"]),
    ]

    @Test("an incoming VM that no session is receiving", arguments: destinationRows)
    func destination(_ row: Row) { row.check(Rules.destination(row.facts)) }

    static let updateRows: [Row] = {
        let u = F.update
        let notRunning = F.with(u) { $0.wasRunning = false }
        func vm(old: Rules.QEMUView?, new: Rules.QEMUView?, update: UpdateInProgress? = F.update) -> Rules.VMFacts {
            F.vm(.updating, alive: old != nil, qemu: old, update: update, successor: new)
        }
        return [
            Row("no update record (an older Ferry): the old QEMU is all there is", F.facts(vm(old: F.running, new: nil, update: nil)),
                [.setRunning(session: nil)], note: ["an update was interrupted; the VM stays in its QEMU (pid 100)"]),
            Row("the new QEMU runs it: the old one stops, the new one is adopted", F.facts(vm(old: F.postmigrate, new: F.ranAfterLoad)),
                [.removeUpdateSocket, .stopQEMU(pid: 100), .adoptSuccessor(pid: 200, u)],
                note: ["an update was interrupted after its switchover; the VM runs in the new QEMU (pid 200)", "the old one is stopped"]),
            Row("the new QEMU runs it, the old one is gone", F.facts(vm(old: nil, new: F.ranAfterLoad)),
                [.removeUpdateSocket, .adoptSuccessor(pid: 200, u)], note: ["after its switchover", "new QEMU (pid 200)"]),
            Row("only the new QEMU, loaded, the guest ran: adopted and resumed", F.facts(vm(old: nil, new: F.loaded)),
                [.removeUpdateSocket, .resumeSuccessor(u), .adoptSuccessor(pid: 200, u)], note: ["after its switchover"]),
            Row("only the new QEMU, loaded, the guest was paused: adopted, left paused",
                F.facts(vm(old: nil, new: F.loaded, update: notRunning)),
                [.removeUpdateSocket, .adoptSuccessor(pid: 200, notRunning)], note: ["after its switchover"]),
            Row("only the new QEMU, still loading: nothing of it runs", F.facts(vm(old: nil, new: F.loading)),
                [.removeUpdateSocket, .stopSuccessor(pid: 200, u), .removeSuccessorSocket(u), .archive(reason: "died")],
                note: ["its QEMU died during an update (pid 100)", "nothing of it runs here"]),
            Row("both, the new one loaded but paused: undone, the old one resumed", F.facts(vm(old: F.postmigrate, new: F.loaded)),
                [.removeUpdateSocket, .stopSuccessor(pid: 200, u), .removeSuccessorSocket(u), .resume, .setRunning(session: nil)],
                note: ["an update was interrupted before its switchover; the VM stays in its QEMU (pid 100)", "resumed"]),
            Row("the old one migrating, no new one: cancelled", F.facts(vm(old: F.migrating, new: nil)),
                [.removeUpdateSocket, .removeSuccessorSocket(u), .cancelMigration, .setRunning(session: nil)],
                note: ["before its switchover", "its QEMU's migration cancelled"]),
            Row("the old one paused, the guest was paused before: not resumed", F.facts(vm(old: F.postmigrate, new: nil, update: notRunning)),
                [.removeUpdateSocket, .removeSuccessorSocket(notRunning), .setRunning(session: nil)], note: ["before its switchover"]),
            Row("neither QEMU: nothing of it runs", F.facts(vm(old: nil, new: nil)),
                [.removeUpdateSocket, .removeSuccessorSocket(u), .archive(reason: "died")], note: ["died during an update"]),
            Row("the new QEMU not answering: nothing, tried again", F.facts(vm(old: F.postmigrate, new: F.busy)),
                [], note: ["an update was interrupted", "asking its new QEMU (pid 200) failed: QMP busy; tried again"]),
            Row("the old QEMU not answering: nothing, tried again", F.facts(vm(old: F.busy, new: F.loaded)),
                [], note: ["an update was interrupted before its switchover", "asking its QEMU failed: QMP busy"]),
        ]
    }()

    @Test("a same-host update whose command is gone", arguments: updateRows)
    func update(_ row: Row) { row.check(.act(Rules.update(row.facts))) }

    static let runningRows: [Row] = [
        Row("the committed record of the session it runs by: cleared", F.facts(F.vm(.running, session: "s1"), F.committed),
            [.clearHandover], note: ["runs here by session s1", "cleared"]),
        Row("a committed record of another session: left", F.facts(F.vm(.running, session: "s0"), F.committed), [], note: []),
        Row("a prepared record: left", F.facts(F.vm(.running, session: "s1"), F.prepared), [], note: []),
        Row("a source's commit record: left", F.facts(F.vm(.running, session: "s1"), F.commit), [], note: []),
    ]

    @Test("a VM that runs here with a record left beside it", arguments: runningRows)
    func running(_ row: Row) { row.check(.act(Rules.running(row.facts))) }

    @Test("a failed step: the note keeps what was found, says which step failed and why, and that it is tried again")
    func failedNote() {
        let plan = Rules.Plan(actions: [.resume, .clearHandover], situation: "vm1: the migration never committed; the VM stays here",
                              outcome: ", resumed")
        #expect(plan.note == "vm1: the migration never committed; the VM stays here, resumed")
        #expect(plan.note(failed: .resume, why: "QEMU refused 'cont'")
            == "vm1: the migration never committed; the VM stays here, but resuming it (cont) failed: QEMU refused 'cont'; tried again on the next pass")
        #expect(Rules.Plan.nothing.note == nil)
    }
}

/// One row of ``ReconcileRules/answer(_:_:)``: the request, what this host knows, the
/// actions and the reply's state and the words of its detail.
struct AnswerRow: Sendable, CustomTestStringConvertible {
    var testDescription: String
    var request: ResolveMessage
    var facts: Rules.AnswerFacts
    var actions: [Rules.Action]
    var reply: ResolvedMessage.State
    var detail: [String]

    init(_ what: String, _ request: ResolveMessage, _ facts: Rules.AnswerFacts, _ actions: [Rules.Action],
         _ reply: ResolvedMessage.State, _ detail: String...) {
        testDescription = what
        self.request = request
        self.facts = facts
        self.actions = actions
        self.reply = reply
        self.detail = detail
    }
}

@Suite("Reconciliation rules: answering a peer's resolve")
struct ReconcileAnswerTests {
    typealias F = Fixture
    static let commit = ResolveMessage(session: "s1", vm: "vm1", decision: .commit)
    static let abort = ResolveMessage(session: "s1", vm: "vm1", decision: .abort)
    static let query = ResolveMessage(session: "s1", vm: "vm1", decision: nil)
    static let incoming = F.vm(.incoming, qemu: F.loaded)

    static func facts(_ vm: Rules.VMFacts?, _ handover: HandoverRecord? = nil, lockHeld: Bool = false,
                      failed: Rules.Action? = nil, unreadable: String? = nil) -> Rules.AnswerFacts {
        Rules.AnswerFacts(vm: vm, handover: handover, handoverUnreadable: unreadable, lockHeld: lockHeld,
                          failed: failed.map { Rules.Failure(action: $0, why: "boom") })
    }

    static func damaged(_ facts: Rules.AnswerFacts) -> Rules.AnswerFacts {
        var facts = facts
        facts.damaged = "state.json is not JSON"
        return facts
    }

    static let rows: [AnswerRow] = {
        let run: [Rules.Action] = [.recordCommitted(F.committed), .resume, .setRunning(session: "s1"), .clearHandover]
        return [
            // The source tells its decision; this host is the destination.
            AnswerRow("commit, prepared here: committed, then it runs", commit, facts(incoming, F.prepared), run, .running, "committed on request"),
            AnswerRow("commit, committed here already and running: the records only", commit,
                      facts(F.vm(.incoming, qemu: F.ranAfterLoad), F.committed), [.setRunning(session: "s1"), .clearHandover], .running),
            AnswerRow("commit, a session here holds the lock: pending", commit, facts(incoming, F.prepared, lockHeld: true),
                      [], .pending, "a session here still handles it"),
            AnswerRow("commit, its QEMU died here: discarded, gone", commit, facts(F.vm(.incoming, alive: false), F.prepared),
                      [.discard(reason: "incoming-died")], .gone, "died"),
            AnswerRow("commit, QEMU not answering: committed recorded, pending", commit, facts(F.vm(.incoming, qemu: F.busy), F.prepared),
                      [.recordCommitted(F.committed)], .pending, "cannot be asked (QMP busy)"),
            AnswerRow("commit, writing committed failed: discarded, gone", commit, facts(incoming, F.prepared, failed: .recordCommitted(F.committed)),
                      [.discard(reason: "incoming-failed")], .gone, "would not run it", "boom"),
            AnswerRow("commit, cont failed: discarded, gone", commit, facts(incoming, F.prepared, failed: .resume),
                      [.discard(reason: "incoming-failed")], .gone, "would not run it"),
            AnswerRow("commit failed and the copy will not exit: pending, never gone", commit,
                      facts(incoming, F.prepared, failed: .discard(reason: "incoming-failed")), [], .pending, "neither runs it nor exits", "boom"),
            AnswerRow("commit, it runs but its phase was not written: running", commit, facts(incoming, F.prepared, failed: .setRunning(session: "s1")),
                      [], .running, "committed on request", "tried again on the next pass"),
            AnswerRow("commit, it runs but its record was not cleared: running", commit, facts(incoming, F.prepared, failed: .clearHandover),
                      [], .running, "committed on request"),
            AnswerRow("commit, a record of another session: gone", commit, facts(incoming, F.with(F.prepared) { $0.session = "s0" }),
                      [], .gone, "no copy of vm1 for this session here"),
            AnswerRow("commit, no record of the VM here: gone", commit, facts(nil), [], .gone, "no copy of vm1"),
            AnswerRow("commit, it runs here by this session (settled before): running", commit,
                      facts(F.vm(.running, qemu: F.running, session: "s1")), [], .running, "it runs here"),
            AnswerRow("commit, it runs here by another session: gone", commit,
                      facts(F.vm(.running, qemu: F.running, session: "s0")), [], .gone, "no copy"),
            AnswerRow("commit, the record of this session but its QEMU is dead: gone", commit,
                      facts(F.vm(.running, alive: false, session: "s1")), [], .gone),
            AnswerRow("commit, an unreadable handover record: pending", commit, facts(incoming, unreadable: "bad JSON"),
                      [], .pending, "cannot be read (bad JSON)"),
            AnswerRow("abort, prepared here: discarded, gone", abort, facts(incoming, F.prepared),
                      [.discard(reason: "incoming-aborted")], .gone, "discarded on the source's abort"),
            AnswerRow("abort, the copy will not exit: pending", abort, facts(incoming, F.prepared, failed: .discard(reason: "incoming-aborted")),
                      [], .pending, "its QEMU here does not exit"),
            AnswerRow("abort, a session here holds the lock: pending", abort, facts(incoming, F.prepared, lockHeld: true), [], .pending),
            // The destination asks; this host is the source.
            AnswerRow("query, commit recorded: commit", query, facts(F.vm(.migratingOut), F.commit), [], .commit,
                      "the source recorded its commit at 2023-11-14T22:13:20Z"),
            AnswerRow("query, commit recorded, the VM record gone: still commit", query, facts(nil, F.commit), [], .commit),
            AnswerRow("query, the migration still runs: pending", query, facts(F.vm(.migratingOut), lockHeld: true), [], .pending,
                      "still running on the source"),
            AnswerRow("query, a commit of another session, the migration runs: pending", query,
                      facts(F.vm(.migratingOut), F.with(F.commit) { $0.session = "s0" }, lockHeld: true), [], .pending),
            AnswerRow("query, no commit, no migration process: abort", query, facts(F.vm(.migratingOut)), [], .abort,
                      "the source never committed this session"),
            AnswerRow("query, the VM runs here: abort", query, facts(F.vm(.running, session: "s0")), [], .abort),
            AnswerRow("query, no VM here: abort", query, facts(nil), [], .abort),
            AnswerRow("query, an unreadable handover record: pending, never abort", query, facts(F.vm(.migratingOut), unreadable: "bad JSON"),
                      [], .pending, "cannot be read"),
            // Damaged files (issue 18): its QEMU may run here though no record is readable.
            AnswerRow("commit, the VM's state here is damaged: pending, never gone", commit, damaged(facts(nil)),
                      [], .pending, "damaged (state.json is not JSON)", "ferry vm repair"),
            AnswerRow("commit, committed here but the state is damaged: pending", commit, damaged(facts(nil, F.committed)), [], .pending),
            AnswerRow("query, the source's state is damaged, no commit record: pending, never abort", query, damaged(facts(nil)),
                      [], .pending, "damaged"),
            AnswerRow("query, the source's state is damaged, its commit record readable: commit", query, damaged(facts(nil, F.commit)),
                      [], .commit),
        ]
    }()

    @Test("answer: each branch", arguments: rows)
    func answer(_ row: AnswerRow) {
        let answer = Rules.answer(row.request, row.facts)
        #expect(answer.actions == row.actions)
        #expect(answer.reply.state == row.reply, "\(answer.reply.detail)")
        for word in row.detail { #expect(answer.reply.detail.contains(word), "detail lacks \"\(word)\": \(answer.reply.detail)") }
    }

    @Test("the lock is taken only for a source's decision about this host's copy of that session")
    func needsLock() {
        #expect(Rules.needsLock(Self.commit, handover: F.prepared))
        #expect(Rules.needsLock(Self.abort, handover: F.committed))
        #expect(!Rules.needsLock(Self.query, handover: F.prepared), "a query decides nothing")
        #expect(!Rules.needsLock(Self.commit, handover: F.with(F.prepared) { $0.session = "s0" }))
        #expect(!Rules.needsLock(Self.commit, handover: F.commit), "a source's own record")
        #expect(!Rules.needsLock(Self.commit, handover: nil))
    }
}
