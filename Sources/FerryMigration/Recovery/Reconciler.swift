import FerryVM
import FerryWire
import Foundation
import Logging

/// Rebuilds this host's view after a crash and settles half-done migrations from the
/// durable handover records (``HandoverRecord``) and the QEMUs that run: exactly one copy
/// of each VM resumes, the other is destroyed. `ferry serve` runs it at start and every
/// few seconds; `ferry vm list` runs it without the network (local repairs only).
///
/// The rules, by what this host finds (docs/PROTOCOL.md, "Switchover and crashes"), are
/// ``ReconcileRules``, pure functions tested as a table; this class only gathers their
/// facts (``ReconcileHost``, ``PeerDaemon``) and carries out their actions:
/// - A VM migrating out whose migration process is gone (``ReconcileRules/source(_:)``):
///   - with a `commit` record: the destination runs the VM; once it says so, the source
///     copy is stopped and removed. If the destination says it has no copy, the source
///     copy resumes (it is then the only one). Unreachable: the source copy stays paused.
///   - without one: the migration never committed and now never will; the source copy
///     resumes (its QEMU's migration cancelled, `cont` if it was paused).
/// - An incoming VM that no session of this daemon is receiving
///   (``ReconcileRules/destination(_:)``):
///   - `committed`: the source decided; the VM runs here (`cont` if the crash came first).
///   - `prepared`: only the source's decision may run or discard it: ask the source.
///   - no record: it never reached `loaded`, so the source cannot commit it: discarded.
/// - A VM in a same-host update whose `ferry vm update` is gone: kept in whichever QEMU
///   holds it (``ReconcileRules/update(_:)``).
/// - A VM running here by a session whose `committed` record is still there: cleared
///   (``ReconcileRules/running(_:)``).
/// - A peer asking (``answer(_:)``, ``ReconcileRules/answer(_:_:)``).
///
/// A step that fails (a store write, a QMP command, a QEMU that will not exit) ends its
/// plan; the note says which and why, and the next pass tries again from what is left.
public final class Reconciler: @unchecked Sendable {
    private let local: any ReconcileHost
    private let peer: any PeerDaemon
    private let logger: Logger
    /// How long to wait for a peer daemon (connect, handshake, answer).
    public var peerTimeout: Duration = .seconds(3)

    public convenience init(store: VMStore, keys: KeyRing?, logger: Logger) {
        self.init(local: StoreHost(store: store), peer: DaemonPeer(keys: keys, logger: logger), logger: logger)
    }

    init(local: any ReconcileHost, peer: any PeerDaemon, logger: Logger) {
        self.local = local
        self.peer = peer
        self.logger = logger
    }

    /// One pass over this host's VMs. `busy`: VMs a live session of this daemon is
    /// handling (left alone). `network`: false settles only what needs no peer.
    /// Returns one line per VM it acted on or that waits for a peer.
    @discardableResult
    public func reconcile(busy: Set<String> = [], network: Bool = true) -> [String] {
        var notes: [String] = []
        for record in local.records() where !busy.contains(record.spec.name) {
            let name = record.spec.name
            // A running VM is looked at only if a handover record is left beside it.
            if record.state.phase == .running, (try? local.handover(of: name)) == nil { continue }
            guard let lock = local.lock(name) else { continue }
            let note: String? = withExtendedLifetime(lock) {
                switch record.state.phase {
                case .migratingOut: settleSource(record, network: network)
                case .incoming: settleDestination(record, network: network)
                case .updating: settleUpdate(record)
                case .running: settle(record, network: network, askQEMU: false) { .act(ReconcileRules.running($0)) }
                }
            }
            if let note { notes.append(note) }
        }
        for note in notes { logger.notice("\(note)") }
        return notes
    }

    /// A VM migrating out with no live migration process (lock held by the caller).
    func settleSource(_ record: VMRecord, network: Bool) -> String? {
        settle(record, network: network, by: ReconcileRules.source)
    }

    /// A same-host update whose `ferry vm update` is gone (lock held by the caller).
    func settleUpdate(_ record: VMRecord) -> String {
        settle(record, network: false) { .act(ReconcileRules.update($0)) } ?? "\(record.spec.name): an update was interrupted"
    }

    /// An incoming VM that no live session is receiving (lock held by the caller).
    func settleDestination(_ record: VMRecord, network: Bool) -> String? {
        settle(record, network: network, by: ReconcileRules.destination)
    }

    /// Records `committed`, then runs the VM (lock held by the caller). True if it runs.
    @discardableResult
    func commit(_ record: VMRecord, _ handover: HandoverRecord) -> Bool {
        let vm = local.facts(of: record, askQEMU: true)
        let plan = ReconcileRules.commit(vm, handover, situation: "\(vm.name): committed", outcome: "; it runs here")
        let (note, failed) = carry(plan, on: vm.name)
        if let note { logger.notice("\(note)") }
        return failed == nil && ReconcileRules.unknown(vm.qemu) == nil
    }

    // MARK: The rules' loop

    /// Gathers the facts of `record` and settles it by `rules`.
    private func settle(_ record: VMRecord, network: Bool, askQEMU: Bool = true,
                        by rules: (ReconcileRules.Facts) -> ReconcileRules.Decision) -> String? {
        var facts = ReconcileRules.Facts(vm: local.facts(of: record, askQEMU: askQEMU), network: network)
        do {
            facts.handover = try local.handover(of: record.spec.name)
        } catch {
            facts.handoverUnreadable = "\(error)"
        }
        return settle(facts, by: rules)
    }

    /// Runs `rules` on `facts`: asks the peer when they say so (once) and decides again with
    /// its answer, then carries out the plan. The note, if any.
    func settle(_ facts: ReconcileRules.Facts, by rules: (ReconcileRules.Facts) -> ReconcileRules.Decision) -> String? {
        var facts = facts
        while true {
            switch rules(facts) {
            case .ask(let request, let peerHost, let peerPort):
                precondition(facts.peer == .notAsked, "the reconcile rules ask the peer once a pass")
                let answer = peer.ask(request, host: peerHost, port: peerPort, timeout: peerTimeout)
                facts.peer = answer.map { .answered($0) } ?? .unreachable
            case .act(let plan):
                return carry(plan, on: facts.vm.name).note
            }
        }
    }

    /// Carries out `plan`'s actions in order; the first that fails ends it.
    private func carry(_ plan: ReconcileRules.Plan, on vm: String) -> (note: String?, failed: ReconcileRules.Failure?) {
        for action in plan.actions {
            do {
                try local.perform(action, on: vm)
            } catch {
                logger.warning("a step settling a VM failed", metadata: ["vm": "\(vm)", "step": "\(action.what)", "error": "\(error)"])
                return (plan.note(failed: action, why: "\(error)"), ReconcileRules.Failure(action: action, why: "\(error)"))
            }
        }
        return (plan.note, nil)
    }

    // MARK: Answering a peer

    /// Answers a peer's ``ResolveMessage`` from this host's records and QEMUs.
    public func answer(_ request: ResolveMessage) -> ResolvedMessage {
        var facts = ReconcileRules.AnswerFacts()
        do {
            facts.handover = try local.handover(of: request.vm)
        } catch {
            facts.handoverUnreadable = "\(error)"
        }
        let record = local.record(request.vm)
        // A VM whose files are damaged may run here all the same (its QEMU found by its
        // command line): no answer may then say `gone`.
        facts.damaged = local.damage(of: request.vm)
        var lock: AnyObject?
        if record != nil {
            if ReconcileRules.needsLock(request, handover: facts.handover) {
                lock = local.lock(request.vm)
                facts.lockHeld = lock == nil
            } else {
                facts.lockHeld = local.isLocked(request.vm)
            }
        }
        // QEMU is asked only with the lock: otherwise a session may hold its monitor.
        facts.vm = record.map { local.facts(of: $0, askQEMU: lock != nil) }
        return withExtendedLifetime(lock) { answer(request, facts) }
    }

    /// Runs the answer rules on `facts`, carries out their actions, and decides again if
    /// one fails (a failed commit discards the copy; one that cannot be discarded is
    /// `pending`). The rules end within three rounds.
    func answer(_ request: ResolveMessage, _ facts: ReconcileRules.AnswerFacts) -> ResolvedMessage {
        var facts = facts
        for _ in 0..<3 {
            let answer = ReconcileRules.answer(request, facts)
            guard let failed = carry(ReconcileRules.Plan(actions: answer.actions, situation: nil), on: request.vm).failed else {
                return answer.reply
            }
            facts.failed = failed
        }
        preconditionFailure("the answer rules did not end within three rounds")
    }

    /// The host part of "host:port" or "[v6]:port".
    public static func host(ofPeer peer: String) -> String {
        if peer.hasPrefix("["), let end = peer.firstIndex(of: "]") { return String(peer[peer.index(after: peer.startIndex)..<end]) }
        if let colon = peer.lastIndex(of: ":") { return String(peer[..<colon]) }
        return peer
    }
}
