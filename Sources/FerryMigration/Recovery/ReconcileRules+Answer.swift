import FerryVM
import FerryWire
import Foundation

/// Answering a peer's `resolve` (``ResolveMessage``) from this host's records and QEMUs.
extension ReconcileRules {
    /// What this host knows when a peer asks about a session.
    struct AnswerFacts: Equatable, Sendable {
        /// The VM's record here; nil if there is none.
        var vm: VMFacts?
        var handover: HandoverRecord? = nil
        var handoverUnreadable: String? = nil
        /// The VM's files here are damaged (what is): a QEMU of it may run all the same.
        var damaged: String? = nil
        /// Another process (a live session, a migration, this host's own reconciler)
        /// holds the VM's lock; for a source's decision, this request could not take it.
        var lockHeld = false
        /// A step of the previous answer's actions failed: the rules choose again.
        var failed: Failure? = nil
    }

    /// An action that failed, and why.
    struct Failure: Equatable, Sendable {
        var action: Action
        var why: String
    }

    /// The reply, once `actions` are carried out. If one fails, the rules are asked again
    /// with ``AnswerFacts/failed``: a failed commit discards the copy (then `gone`), a
    /// copy that cannot be discarded either is `pending`.
    struct Answer: Equatable, Sendable {
        var actions: [Action]
        var reply: ResolvedMessage

        init(_ state: ResolvedMessage.State, _ detail: String, doing actions: [Action] = []) {
            self.actions = actions
            reply = ResolvedMessage(state: state, detail: detail)
        }
    }

    /// Whether answering `request` needs the VM's lock (held while the actions run): a
    /// source's decision about the copy this host holds for that session.
    static func needsLock(_ request: ResolveMessage, handover: HandoverRecord?) -> Bool {
        request.decision != nil && holdsCopy(for: request, handover)
    }

    /// The handover record is this host's, as the destination of the request's session.
    private static func holdsCopy(for request: ResolveMessage, _ handover: HandoverRecord?) -> Bool {
        handover?.role == .destination && handover?.session == request.session
    }

    static func answer(_ request: ResolveMessage, _ f: AnswerFacts) -> Answer {
        if let decision = request.decision { return answerSource(request, decision, f) }
        return answerDestination(request, f)
    }

    /// The asker is the source, telling its decision; this host is (or was) the destination.
    private static func answerSource(_ request: ResolveMessage, _ decision: ResolveMessage.Decision, _ f: AnswerFacts) -> Answer {
        if let why = f.handoverUnreadable, f.vm != nil {
            // It may name this session: `gone` would let the source resume beside this copy.
            return Answer(.pending, "its handover record here cannot be read (\(why)); ask again")
        }
        if let why = f.damaged {
            // Its QEMU may run here although no record says so: `gone` could run it twice.
            return Answer(.pending, "its files here are damaged (\(why)); repair it here (ferry vm repair) and ask again")
        }
        guard let vm = f.vm, let h = f.handover, holdsCopy(for: request, h) else {
            if let vm = f.vm, vm.session == request.session, vm.alive {
                return Answer(.running, "it runs here")
            }
            return Answer(.gone, "no copy of \(request.vm) for this session here")
        }
        guard !f.lockHeld else {
            return Answer(.pending, "a session here still handles it; ask again")
        }
        if let failed = f.failed { return afterFailure(decision, failed) }
        guard decision == .commit else {
            return Answer(.gone, "discarded on the source's abort", doing: [.discard(reason: "incoming-aborted")])
        }
        guard vm.alive else {
            return Answer(.gone, "its QEMU here died; discarded", doing: [.discard(reason: "incoming-died")])
        }
        let plan = commit(vm, h, situation: "", outcome: "")
        if let why = unknown(vm.qemu) {
            // The decision is recorded; the copy runs on a later pass, or the source asks again.
            return Answer(.pending, "committed here, but its QEMU cannot be asked (\(why)); ask again", doing: plan.actions)
        }
        return Answer(.running, "committed on request", doing: plan.actions)
    }

    /// The source's decision could not be carried out in full.
    private static func afterFailure(_ decision: ResolveMessage.Decision, _ failed: Failure) -> Answer {
        switch failed.action {
        case .discard:
            // Neither run nor stopped: it must not be called gone.
            let detail = decision == .commit ? "its QEMU here neither runs it nor exits" : "its QEMU here does not exit"
            return Answer(.pending, "\(detail) (\(failed.why)); ask again")
        case .setRunning, .clearHandover:
            // The guest runs; only the bookkeeping after `cont` failed.
            let detail = "\(failed.action.what) here failed: \(failed.why); tried again on the next pass"
            return Answer(.running, "committed on request (\(detail))")
        default:
            // Not run (the record not written, or `cont` refused): this copy must never run.
            let detail = "its QEMU here would not run it (\(failed.action.what) failed: \(failed.why)); discarded"
            return Answer(.gone, detail, doing: [.discard(reason: "incoming-failed")])
        }
    }

    /// The asker is the destination, asking what the source decided; this host is (or was)
    /// the source. Nothing is done here: the answer comes from the records alone.
    private static func answerDestination(_ request: ResolveMessage, _ f: AnswerFacts) -> Answer {
        if let why = f.handoverUnreadable {
            return Answer(.pending, "the source's handover record cannot be read (\(why)); ask again")
        }
        if let h = f.handover, h.role == .source, h.session == request.session, h.decision == .commit {
            let at = ISO8601DateFormatter().string(from: h.at)
            return Answer(.commit, "the source recorded its commit at \(at)")
        }
        if let why = f.damaged {
            // Its state here may have said migrating-out with a migration still running.
            return Answer(.pending, "the source's files are damaged (\(why)); ask again once it is repaired")
        }
        if let vm = f.vm, vm.phase == .migratingOut, f.lockHeld {
            return Answer(.pending, "the migration is still running on the source")
        }
        return Answer(.abort, "the source never committed this session")
    }
}
