import FerryIO
import FerryQMP
import FerryTransport
import FerryWire
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import FerryMigration

@Suite("Orchestration: phases, errors, outcomes, rates")
struct OrchestrationTests {
    @Test("a network migration's phases run in order, queueing at either end included; nothing skips ahead or goes back")
    func sourcePhases() throws {
        var machine = PhaseMachine(PhaseGraph<MigrationPhase>.networkSource, start: .preparing)
        let path: [MigrationPhase] = [.queued, .preparing, .connecting, .negotiating, .sendingBootFiles, .startingDestination,
                                      .queued, .startingDestination, .openingChannels, .transferring, .switchover,
                                      .committing, .done]
        for phase in path {
            #expect(try machine.move(to: phase), "\(phase)")
            #expect(machine.current == phase)
        }
        #expect(try machine.move(to: .done) == false, "the same phase again is no change")
        #expect(throws: IllegalTransition(from: "done", to: "transferring")) { try machine.move(to: .transferring) }

        var early = PhaseMachine(PhaseGraph<MigrationPhase>.networkSource, start: .preparing)
        for illegal: MigrationPhase in [.transferring, .committing, .done, .switchover] {
            #expect(throws: IllegalTransition.self) { try early.move(to: illegal) }
            #expect(early.current == .preparing, "a refused change leaves the phase as it was")
        }
        // The destination may say `loaded` before QEMU's STOP event is seen.
        var fast = PhaseMachine(PhaseGraph<MigrationPhase>.networkSource, start: .transferring)
        #expect(try fast.move(to: .committing))
    }

    @Test("a same-host update never queues, connects or opens channels")
    func updatePhases() throws {
        let graph = PhaseGraph<MigrationPhase>.sameHostUpdate
        for (from, to) in [(MigrationPhase.preparing, MigrationPhase.queued), (.preparing, .connecting),
                           (.startingDestination, .openingChannels), (.transferring, .committing)] {
            #expect(!graph.allows(from, to), "\(from) -> \(to)")
        }
        var machine = PhaseMachine(graph, start: .preparing)
        for phase: MigrationPhase in [.startingDestination, .transferring, .switchover, .committing, .done] {
            #expect(try machine.move(to: phase))
        }
    }

    @Test("an incoming migration may be aborted until it is committed, and never leaves committed")
    func incomingPhases() throws {
        let graph = IncomingPhase.graph
        for phase: IncomingPhase in [.offered, .receivingBootFiles, .queued, .loading, .prepared] {
            #expect(graph.allows(phase, .aborted), "\(phase)")
        }
        #expect(!graph.allows(.committed, .aborted) && !graph.allows(.aborted, .loading))
        #expect(!graph.allows(.loading, .committed), "no commit without prepared")
        var machine = PhaseMachine(graph, start: .offered)
        for phase: IncomingPhase in [.queued, .loading, .prepared, .committed] { #expect(try machine.move(to: phase)) }
    }

    @Test("the outcome of a rolled-back failure: died beats uncertain beats cancelled beats failed")
    func outcomes() {
        let cancel = MigrateError.stopped(.cancelled)
        let timeout = MigrateError.stopped(.timedOut(seconds: 5))
        let lost = MigrateError.controlLost("peer reset")
        typealias R = MigrationOutcome.Rollback
        #expect(MigrationOutcome.of(lost, R(vmSafe: true, qemuDied: false)) == .failedVMOnSource)
        #expect(MigrationOutcome.of(timeout, R(vmSafe: true, qemuDied: false)) == .failedVMOnSource)
        #expect(MigrationOutcome.of(cancel, R(vmSafe: true, qemuDied: false)) == .cancelled)
        #expect(MigrationOutcome.of(cancel, R(vmSafe: false, qemuDied: false)) == .uncertain)
        #expect(MigrationOutcome.of(lost, R(vmSafe: false, qemuDied: true)) == .vmDied)
        #expect(MigrationOutcome.of(UpdateError.newQEMUExited(pid: 7), vmSafe: true) == .failedVMOnSource)
        #expect(MigrationOutcome.of(UpdateError.newQEMUExited(pid: 7), vmSafe: false) == .uncertain)
        // Past the commit nothing rolls back, whatever the error.
        #expect(MigrationOutcome.isPastCommit(.commitUnconfirmed("no answer"), commitRecorded: false))
        #expect(MigrationOutcome.isPastCommit(lost, commitRecorded: true))
        #expect(!MigrationOutcome.isPastCommit(cancel, commitRecorded: false))
    }

    @Test("errors say what happened in the operator's words, and tell the source the right code")
    func errorTexts() {
        #expect(MigrateError.stopped(.timedOut(seconds: 5)).description == "timed out after 5 s (--timeout)")
        #expect(MigrateError.qemu(.busy(.active)).description == "QEMU already has a migration in progress (active)")
        #expect(MigrateError.noChannels(["a", "b"]).description == "no data channel could be opened: a; b")
        #expect(MigrateError.claim(.notRunning("vm1")).description.contains("VM 'vm1' is not running"))
        #expect(MigrateError.refused(.said(ErrorMessage(code: .vmExists, message: "x"))).description
                == "the destination refused the VM: x [vm-exists]")
        #expect(IncomingError.refused(.badOffer, "bad").frame == ErrorMessage(code: .badOffer, message: "bad"))
        #expect(IncomingError.peer(.said(ErrorMessage(code: .busy, message: "b"))).frame.code == .busy)
        #expect(IncomingError.peer(.wire(.unexpectedFrame(.ack, expected: "offer"))).frame.code == .protocolViolation)
        #expect(IncomingError.dataPath(.aborted("QEMU closed")).frame == ErrorMessage(code: .qemuFailed, message: "data path: QEMU closed"))
        #expect(IncomingError.dataPath(.protocolViolation("dup")).frame.code == .protocolViolation)
        #expect(IncomingError.sourceGone("lost the source").frame.code == .aborted)
        #expect(throws: QEMUFailure.self) { try QEMUFailure.check(.failed, reason: "boom") }
        #expect(throws: Never.self) { try QEMUFailure.check(.active, reason: nil) }
    }

    @Test("a connect is tried again only for failures of the network, never for what the daemon states; the waits double")
    func connectRetry() {
        let reset = SocketError("read", peer: "10.0.0.2:7470", kind: .system(ECONNRESET))
        #expect(SourceMigration.isTransient(.unreachable(destination: "b:7470", reset)))
        #expect(SourceMigration.isTransient(.handshake(destination: "b", .connection(reset))))
        #expect(!SourceMigration.isTransient(.handshake(destination: "b", .said(ErrorMessage(code: .authenticationFailed, message: "no")))))
        #expect(!SourceMigration.isTransient(.handshake(destination: "b", .security(.authenticationFailed("wrong key")))))
        #expect(!SourceMigration.isTransient(.refused(.connection(reset))), "after the welcome, not a connect failure")
        for attempt in 1...3 {
            let wait = SourceMigration.connectBackoff(attempt: attempt)
            let nominal = 0.25 * Double(1 << (attempt - 1))
            #expect(wait >= nominal * 0.75 && wait <= nominal * 1.25, "attempt \(attempt): \(wait)")
        }
    }

    @Test("rates come from the interval between samples, per interface, and only over intervals long enough to mean something")
    func rates() {
        func ch(_ id: Int, _ nic: String, _ bytes: UInt64) -> ChannelStats {
            ChannelStats(channel: id, interface: nic, payloadBytes: bytes, wireBytes: bytes, alive: true)
        }
        var sampler = RateSampler(minimumInterval: 0.2)
        let first = sampler.sample(now: 1.0, streamBytes: 0, channels: [ch(0, "eth0", 0), ch(1, "eth1", 0)])
        #expect(first.interfaceBytes == ["eth0": 0, "eth1": 0] && sampler.bitsPerSecond == 0)
        _ = sampler.sample(now: 1.5, streamBytes: 1_000_000, channels: [ch(0, "eth0", 750_000), ch(1, "eth1", 250_000)])
        #expect(sampler.bitsPerSecond == 16_000_000)
        #expect(sampler.interfaceBitsPerSecond == ["eth0": 12_000_000, "eth1": 4_000_000])
        // 0.1 s later: too short to compute a rate; the last one stands, the timeline still grows.
        let quick = sampler.sample(now: 1.6, streamBytes: 9_000_000, channels: [ch(0, "eth0", 9_000_000), ch(1, "eth1", 250_000)])
        #expect(sampler.bitsPerSecond == 16_000_000 && quick.interfaceBytes["eth0"] == 9_000_000)
        _ = sampler.sample(now: 1.75, streamBytes: 2_000_000, channels: [ch(0, "eth0", 1_750_000), ch(1, "eth1", 250_000)])
        #expect(sampler.bitsPerSecond == 32_000_000 && sampler.interfaceBitsPerSecond["eth1"] == 0)
    }

    @Test("the journal's transfer time runs from migrate to QEMU's completion, or to now for a success it did not see end")
    func journal() {
        var journal = MigrationJournal()
        #expect(journal.transferSeconds(succeeded: true, now: 9) == nil, "no migrate, no transfer")
        journal.migrateIssuedAt = 2
        #expect(journal.transferSeconds(succeeded: false, now: 9) == nil)
        #expect(journal.transferSeconds(succeeded: true, now: 9) == 7)
        journal.completedAt = 5
        #expect(journal.transferSeconds(succeeded: false, now: 9) == 3)
        journal.addQueued(1.25, "on this host")
        journal.addQueued(2, "at the destination")
        #expect(journal.queuedSeconds == 3.25 && journal.queueSummary == "1.2 s on this host; 2.0 s at the destination")
    }
}
