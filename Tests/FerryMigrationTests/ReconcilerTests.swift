@testable import FerryMigration
import FerryIO
import FerryQMP
@testable import FerryVM
import FerryWire
import Foundation
import Logging
import Testing

/// The safety rules checked over every combination of facts, not only the table's rows.
@Suite("Reconciliation rules: safety over every combination of facts")
struct ReconcileSafetyTests {
    typealias F = Fixture
    static let peers: [Rules.PeerAnswer] = [.notAsked, .unreachable]
        + [ResolvedMessage.State.commit, .abort, .pending, .running, .gone].map { F.says($0) }
    static let handovers: [HandoverRecord?] = [nil, F.commit, F.prepared, F.committed,
                                               F.with(F.commit) { $0.session = "s0" }, F.with(F.prepared) { $0.session = "s0" }]

    static func all(_ phase: VMPhase) -> [Rules.Facts] {
        var all: [Rules.Facts] = []
        for alive in [true, false] {
            for view in F.views {
                for handover in handovers {
                    for unreadable in [nil, "bad JSON"] {
                        for network in [true, false] {
                            for peer in peers {
                                let vm = F.vm(phase, alive: alive, qemu: view, session: "s1")
                                all.append(F.facts(vm, handover, network: network, peer: peer, unreadable: unreadable))
                            }
                        }
                    }
                }
            }
        }
        return all
    }

    static func isCommit(_ handover: HandoverRecord?) -> Bool {
        handover?.role == .source && handover?.decision == .commit
    }

    static func said(_ peer: Rules.PeerAnswer, _ state: ResolvedMessage.State) -> Bool {
        if case .answered(let answer) = peer { return answer.state == state }
        return false
    }

    @Test("a source copy with a commit record (or an unreadable record) runs again only once the destination says gone")
    func sourceStaysPaused() {
        for f in Self.all(.migratingOut) {
            switch Rules.source(f) {
            case .ask:
                #expect(f.network && f.peer == .notAsked && Self.isCommit(f.handover), "asked: \(f)")
            case .act(let plan):
                let mayHaveCommitted = f.handoverUnreadable != nil || Self.isCommit(f.handover)
                guard mayHaveCommitted && !Self.said(f.peer, .gone) else { continue }
                let resuming = plan.actions.filter { [.resume, .cancelMigration, .clearHandover, .setRunning(session: nil)].contains($0) }
                #expect(resuming.isEmpty, "\(f)\n→ \(plan.actions)")
            }
        }
    }

    @Test("a destination copy runs only with committed recorded or the source's commit")
    func destinationRunsOnlyOnCommit() {
        for f in Self.all(.incoming) {
            guard case .act(let plan) = Rules.destination(f) else { continue }
            let runs = plan.actions.contains {
                switch $0 {
                case .recordCommitted, .resume, .setRunning: true
                default: false
                }
            }
            guard runs else { continue }
            let ours = f.handover?.role == .destination
            let committed = ours && f.handover?.decision == .committed
            let told = ours && f.handover?.decision == .prepared && Self.said(f.peer, .commit)
            #expect(f.handoverUnreadable == nil && f.vm.alive && (committed || told), "\(f)\n→ \(plan.actions)")
        }
    }

    @Test("an update never lets both QEMUs run the guest, and never stops a new QEMU that runs it")
    func updateOneCopy() {
        let olds: [Rules.QEMUView?] = F.views + [nil]
        for old in olds {
            for new in olds {
                for wasRunning in [true, false] {
                    let update = F.with(F.update) { $0.wasRunning = wasRunning }
                    let f = F.facts(F.vm(.updating, alive: old != nil, qemu: old, update: update, successor: new))
                    let actions = Rules.update(f).actions
                    let newRuns = if case .answered(let run, _)? = new { run.running } else { false }
                    let toNew = actions.contains { if case .adoptSuccessor = $0 { true } else if case .resumeSuccessor = $0 { true } else { false } }
                    let toOld = actions.contains(.resume) || actions.contains(.setRunning(session: nil))
                    #expect(!(toNew && toOld), "old \(String(describing: old)), new \(String(describing: new)) → \(actions)")
                    if newRuns {
                        #expect(!actions.contains { if case .stopSuccessor = $0 { true } else { false } }, "stopped a running new QEMU: \(actions)")
                        #expect(!toOld, "the old QEMU taken back while the new one runs: \(actions)")
                    }
                }
            }
        }
    }

    static func answerFacts() -> [Rules.AnswerFacts] {
        let vms: [Rules.VMFacts?] = [nil] + F.views.map { F.vm(.incoming, qemu: $0) } + [
            F.vm(.incoming, alive: false), F.vm(.running, qemu: F.running, session: "s1"),
            F.vm(.running, alive: false, session: "s1"), F.vm(.running, qemu: F.running, session: "s0"),
            F.vm(.migratingOut, qemu: F.postmigrate),
        ]
        let failures: [Rules.Action?] = [nil, .recordCommitted(F.committed), .resume, .setRunning(session: "s1"), .clearHandover,
                                         .discard(reason: "incoming-failed"), .discard(reason: "incoming-aborted")]
        var all: [Rules.AnswerFacts] = []
        for vm in vms {
            for handover in handovers {
                for unreadable in [nil, "bad JSON"] {
                    for lockHeld in [true, false] {
                        for failed in failures {
                            all.append(Rules.AnswerFacts(vm: vm, handover: handover, handoverUnreadable: unreadable, lockHeld: lockHeld,
                                                         failed: failed.map { Rules.Failure(action: $0, why: "boom") }))
                        }
                    }
                }
            }
        }
        return all
    }

    @Test("answer: gone only when this host's copy is discarded or was never there; abort only without a commit record")
    func answerSafety() {
        let requests = [ResolveMessage.Decision.commit, .abort].map { ResolveMessage(session: "s1", vm: "vm1", decision: $0) }
        for f in Self.answerFacts() {
            for request in requests {
                let answer = Rules.answer(request, f)
                let holdsCopy = f.vm != nil && (f.handoverUnreadable != nil || (f.handover?.role == .destination && f.handover?.session == "s1"))
                if answer.reply.state == .gone {
                    let discards = answer.actions.contains { if case .discard = $0 { true } else { false } }
                    #expect(!holdsCopy || discards, "gone while holding a copy: \(f) → \(answer)")
                    if case .discard? = f.failed?.action { #expect(!holdsCopy, "gone after a failed discard: \(f)") }
                }
                if answer.reply.state == .running, holdsCopy, f.failed == nil {
                    #expect(answer.actions.contains(.setRunning(session: "s1")), "running without running it: \(f) → \(answer)")
                }
            }
            let query = Rules.answer(ResolveMessage(session: "s1", vm: "vm1", decision: nil), f)
            #expect(query.actions.isEmpty, "a query changes nothing")
            if query.reply.state == .abort {
                #expect(f.handoverUnreadable == nil && !(Self.isCommit(f.handover) && f.handover?.session == "s1"), "abort with a commit recorded: \(f)")
            }
        }
    }

    @Test("answer: when every step fails, the rules end within three rounds and never say gone after a failed discard")
    func answerEnds() {
        let requests = [ResolveMessage.Decision.commit, .abort].map { ResolveMessage(session: "s1", vm: "vm1", decision: $0) }
        for start in Self.answerFacts() where start.failed == nil {
            for request in requests {
                var f = start
                var answer = Rules.answer(request, f)
                var rounds = 1
                while let first = answer.actions.first, rounds <= 3 {
                    f.failed = Rules.Failure(action: first, why: "boom")
                    answer = Rules.answer(request, f)
                    rounds += 1
                }
                #expect(answer.actions.isEmpty, "no end: \(start)")
                #expect(rounds <= 3)
                if case .discard? = f.failed?.action { #expect(answer.reply.state == .pending) }
            }
        }
    }
}

/// A host whose steps are recorded and fail when `fails` says so.
final class FakeHost: ReconcileHost {
    let performed = Locked<[Rules.Action]>([])
    let fails: @Sendable (Rules.Action) -> Bool
    init(fails: @escaping @Sendable (Rules.Action) -> Bool = { _ in false }) { self.fails = fails }

    func records() -> [VMRecord] { [] }
    func record(_ vm: String) -> VMRecord? { nil }
    func lock(_ vm: String) -> AnyObject? { nil }
    func isLocked(_ vm: String) -> Bool { false }
    func handover(of vm: String) throws -> HandoverRecord? { nil }
    func facts(of record: VMRecord, askQEMU: Bool) -> Rules.VMFacts {
        Rules.VMFacts(name: record.spec.name, phase: record.state.phase, pid: record.state.pid, alive: record.alive)
    }
    func perform(_ action: Rules.Action, on vm: String) throws {
        performed.withLock { $0.append(action) }
        if fails(action) { throw VMError.io("disk full") }
    }
}

final class FakePeer: PeerDaemon {
    let answer: ResolvedMessage?
    let asked = Locked<[String]>([])
    init(_ answer: ResolvedMessage?) { self.answer = answer }
    func ask(_ request: ResolveMessage, host: String, port: UInt16, timeout: Duration) -> ResolvedMessage? {
        asked.withLock { $0.append("\(host):\(port) \(request.session) \(request.decision?.rawValue ?? "query")") }
        return answer
    }
}

@Suite("Reconciler: asking the peer, carrying out the plan, reporting a failed step")
struct ReconcilerTests {
    typealias F = Fixture
    /// The failed steps these tests provoke are logged as warnings: not here.
    static let quiet = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    @Test("asks the peer once, decides with its answer, and carries out every step")
    func asksThenActs() {
        let host = FakeHost()
        let peer = FakePeer(ResolvedMessage(state: .gone, detail: "its QEMU died"))
        let reconciler = Reconciler(local: host, peer: peer, logger: Self.quiet)
        let note = reconciler.settle(F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit), by: Rules.source)
        #expect(peer.asked.current == ["b:7470 s1 commit"])
        #expect(host.performed.current == [.resume, .clearHandover, .setRunning(session: nil)])
        #expect(note == "vm1: committed, but b has no copy (its QEMU died); the source copy runs again")
    }

    @Test("an unreachable peer leaves the source copy paused")
    func unreachable() {
        let host = FakeHost()
        let reconciler = Reconciler(local: host, peer: FakePeer(nil), logger: Self.quiet)
        let note = reconciler.settle(F.facts(F.vm(.migratingOut, qemu: F.postmigrate), F.commit), by: Rules.source)
        #expect(host.performed.current.isEmpty)
        #expect(note?.contains("did not answer (unreachable), the source copy stays paused") == true, "\(note ?? "")")
    }

    @Test("a failed step ends the plan: later steps are not taken, the note says which failed and why")
    func failedStep() {
        let host = FakeHost(fails: { $0 == .resume })
        let reconciler = Reconciler(local: host, peer: FakePeer(nil), logger: Self.quiet)
        let note = reconciler.settle(F.facts(F.vm(.migratingOut, qemu: F.postmigrate)), by: Rules.source)
        #expect(host.performed.current == [.resume], "the phase must stay migrating-out for the next pass")
        #expect(note == "vm1: the migration never committed; the VM stays here, but resuming it (cont) failed: disk full; tried again on the next pass")
    }

    @Test("answer: a commit whose cont fails discards the copy (gone); one that will not exit either is pending")
    func answerAfterFailures() {
        let commit = ResolveMessage(session: "s1", vm: "vm1", decision: .commit)
        let facts = Rules.AnswerFacts(vm: F.vm(.incoming, qemu: F.loaded), handover: F.prepared)

        let contFails = FakeHost(fails: { $0 == .resume })
        #expect(Reconciler(local: contFails, peer: FakePeer(nil), logger: Self.quiet).answer(commit, facts).state == .gone)
        #expect(contFails.performed.current == [.recordCommitted(F.committed), .resume, .discard(reason: "incoming-failed")])

        let nothingWorks = FakeHost(fails: { $0 == .resume || $0 == .discard(reason: "incoming-failed") })
        let reply = Reconciler(local: nothingWorks, peer: FakePeer(nil), logger: Self.quiet).answer(commit, facts)
        #expect(reply.state == .pending && reply.detail.contains("neither runs it nor exits (disk full)"), "\(reply)")

        let bookkeeping = FakeHost(fails: { $0 == .clearHandover })
        #expect(Reconciler(local: bookkeeping, peer: FakePeer(nil), logger: Self.quiet).answer(commit, facts).state == .running)
    }

    /// A state directory with one VM `vm1` whose QEMU is not running (no root, no QEMU).
    func store(phase: VMPhase, session: String? = nil, handover: String? = nil) throws -> VMStore {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-recon-\(UUID().uuidString.prefix(8))").path
        let store = VMStore(paths: StatePaths(root: root))
        let vm = store.vmPaths("vm1")
        try FileManager.default.createDirectory(atPath: vm.directory, withIntermediateDirectories: true)
        let spec = VMSpec(name: "vm1", memoryMiB: 64, cpus: 1, kernel: BootFile(name: "k", byteCount: 1, sha256: String(repeating: "0", count: 64)),
                          initrd: nil, append: "", accelerator: .tcg, machine: "pc", cpuModel: "qemu64")
        var state = VMState(phase: phase, pid: Int32.max - 7)  // no such process
        state.session = session
        try store.write(spec, to: vm.spec)
        try store.write(state, to: vm.state)
        if let handover { try handover.write(toFile: vm.handover, atomically: true, encoding: .utf8) }
        return store
    }

    @Test("with the real store: a dead source copy without a commit is removed")
    func realStoreDeadSource() throws {
        let store = try store(phase: .migratingOut)
        defer { try? FileManager.default.removeItem(atPath: store.paths.root) }
        let notes = Reconciler(store: store, keys: nil, logger: Self.quiet).reconcile(network: false)
        #expect(notes == ["vm1: its QEMU died during a migration (pid \(Int32.max - 7)); nothing of it runs here"])
        #expect(store.list().isEmpty)
    }

    @Test("with the real store: an unreadable handover record decides nothing and is reported")
    func realStoreUnreadable() throws {
        let store = try store(phase: .migratingOut, handover: "{ not json")
        defer { try? FileManager.default.removeItem(atPath: store.paths.root) }
        let notes = Reconciler(store: store, keys: nil, logger: Self.quiet).reconcile(network: false)
        #expect(notes.count == 1 && notes[0].contains("its handover record cannot be read"), "\(notes)")
        #expect(try store.record("vm1").state.phase == .migratingOut, "left for the next pass")
    }

    @Test("with the real store: a committed record left beside a VM running by its session is cleared")
    func realStoreRunning() throws {
        let store = try store(phase: .running, session: "s1")
        defer { try? FileManager.default.removeItem(atPath: store.paths.root) }
        try store.recordHandover("vm1", F.committed)
        let reconciler = Reconciler(store: store, keys: nil, logger: Self.quiet)
        #expect(reconciler.reconcile(network: false) == ["vm1: runs here by session s1; its settled handover record is cleared"])
        #expect(try store.readHandover("vm1") == nil)
        #expect(reconciler.reconcile(network: false).isEmpty, "settled once")
    }
}
