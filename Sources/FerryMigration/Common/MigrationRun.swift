import FerryIO
import FerryQMP
import FerryTransport
import Foundation
import Logging

/// What one migration records as it happens, and the report is made from: its events,
/// the per-NIC timeline, QEMU's last account and the moments the figures come from.
struct MigrationJournal {
    var events: [MigrationReport.Event] = []
    var timeline: [MigrationReport.Sample] = []
    /// QEMU's latest `query-migrate`.
    var lastInfo: MigrationInfo?
    /// Seconds since the start: QEMU told to migrate, and QEMU done sending.
    var migrateIssuedAt: Double?
    var completedAt: Double?
    /// QEMU's STOP on the source (QEMU's own timestamp, seconds since the epoch).
    var stopEventAt: Double?
    /// From that STOP to the VM running at the destination.
    var switchoverMilliseconds: Double?
    /// The switchover's moments on this side, and the account of the pause once the
    /// destination's are known.
    var switchover = SourceSwitchoverTimes()
    var pause: MigrationReport.Pause?
    var queuedSeconds: Double?
    var queueSummary: String?
    /// From the disk copies' start to every copy caught up.
    var diskCopySeconds: Double?
    /// The limits in force on the guest's writes to its disks, by guest name (vda: bytes
    /// per second; each lower than the last), for progress, the report and the rollback.
    var diskWriteLimits: [String: UInt64] = [:]
    /// The vCPU throttle over the migration (`--converge`), nil with `--converge none`.
    var convergence: ConvergenceAccount?

    /// From `migrate` to QEMU's completion (to now, for a success whose QEMU finished
    /// without Ferry seeing it).
    func transferSeconds(succeeded: Bool, now: Double) -> Double? {
        guard let issued = migrateIssuedAt, let end = completedAt ?? (succeeded ? now : nil) else { return nil }
        return end - issued
    }

    /// Adds a wait in line (at this host or the destination) to the queue figures.
    mutating func addQueued(_ seconds: Double, _ where: String) {
        queuedSeconds = (queuedSeconds ?? 0) + seconds
        let text = String(format: "%.1f s ", seconds) + `where`
        queueSummary = queueSummary.map { $0 + "; " + text } ?? text
    }

    /// The guest's pause, from QEMU's STOP to `now` (the VM runs on the other side).
    mutating func guestResumed() {
        if let stop = stopEventAt { switchoverMilliseconds = (Date().timeIntervalSince1970 - stop) * 1000 }
    }
}

/// Rates over the last interval, from byte counters sampled a few times a second: the
/// progress display's figures, kept out of the transfer loop. A value; no clock.
struct RateSampler {
    /// Shortest interval a rate is computed over (shorter ones are too noisy to show).
    var minimumInterval = 0.2
    private var lastAt: Double?
    private var lastBytes: UInt64 = 0
    private var lastChannelBytes: [Int: UInt64] = [:]
    private(set) var bitsPerSecond = 0.0
    private(set) var interfaceBitsPerSecond: [String: Double] = [:]

    init(minimumInterval: Double = 0.2) { self.minimumInterval = minimumInterval }

    /// Takes a sample at `now` (seconds); returns the timeline's per-interface bytes.
    mutating func sample(now: Double, streamBytes: UInt64, channels: [ChannelStats]) -> MigrationReport.Sample {
        var perInterface: [String: UInt64] = [:]
        for c in channels { perInterface[c.interface, default: 0] += c.payloadBytes }
        guard let since = lastAt else {
            lastAt = now
            lastBytes = streamBytes
            for c in channels { lastChannelBytes[c.channel] = c.payloadBytes }
            return .init(at: now, interfaceBytes: perInterface)
        }
        let interval = now - since
        if interval >= minimumInterval {
            bitsPerSecond = Double(streamBytes &- lastBytes) * 8 / interval
            interfaceBitsPerSecond = [:]
            for c in channels {
                let delta = c.payloadBytes &- (lastChannelBytes[c.channel] ?? 0)
                interfaceBitsPerSecond[c.interface, default: 0] += Double(delta) * 8 / interval
                lastChannelBytes[c.channel] = c.payloadBytes
            }
            lastBytes = streamBytes
            lastAt = now
        }
        return .init(at: now, interfaceBytes: perInterface)
    }
}

/// The skeleton every kind of migration runs on (a network migration's source, a
/// same-host update): the phase and its one transition, the journal, progress, and the
/// parts of the report they share.
///
/// Owned by the thread that runs the migration (the command's main thread): it is not
/// Sendable and never handed to another thread; helper threads reach the migration
/// through its event queue.
final class MigrationRun {
    let vm: String
    let logger: Logger
    let clock = Stopwatch()
    let startedAt = Date()
    let ferryCPUStart = ProcessStats.ownCPUSeconds()
    private let progress: @Sendable (MigrationProgress) -> Void
    private var machine: PhaseMachine<MigrationPhase>
    var journal = MigrationJournal()
    /// The thread that runs the migration; asserted (debug builds) where the state changes.
    private var owner = ThreadOwner()

    init(vm: String, graph: PhaseGraph<MigrationPhase>, logger: Logger, progress: @escaping @Sendable (MigrationProgress) -> Void) {
        self.vm = vm
        self.logger = logger
        self.progress = progress
        machine = PhaseMachine(graph, start: .preparing)
    }

    var phase: MigrationPhase { machine.current }
    var elapsed: Double { clock.elapsed }

    /// An event for the report, and the log; `at` when it happened earlier than now (a
    /// helper thread's note, taken later), in its place in time.
    func note(_ what: String, at: Double? = nil) {
        owner.check("a migration's journal")
        let at = at ?? clock.elapsed
        let index = journal.events.lastIndex { $0.at <= at }.map { $0 + 1 } ?? 0
        journal.events.insert(.init(at: at, what: what), at: index)
        logger.info("\(what)", metadata: ["vm": "\(vm)"])
    }

    /// The one place the phase changes (see ``PhaseMachine``); the display hears of it.
    func move(to next: MigrationPhase, streamBytes: UInt64 = 0, channels: [ChannelStats] = []) throws(IllegalTransition) {
        owner.check("a migration's phase")
        if try machine.move(to: next) {
            show(streamBytes: streamBytes, channels: channels)
        }
    }

    /// Shows progress as it stands.
    func show(streamBytes: UInt64 = 0, bitsPerSecond: Double = 0, channels: [ChannelStats] = [],
              interfaceBitsPerSecond: [String: Double] = [:], note: String? = nil,
              queuePosition: Int? = nil, queueLength: Int? = nil) {
        progress(MigrationProgress(phase: phase, elapsedSeconds: clock.elapsed, qemu: journal.lastInfo, streamBytes: streamBytes,
                                   bitsPerSecond: bitsPerSecond, channels: channels, interfaceBitsPerSecond: interfaceBitsPerSecond,
                                   note: note, queuePosition: queuePosition, queueLength: queueLength,
                                   diskWriteLimits: journal.diskWriteLimits))
    }

    /// The failure's line in the events, and the phase it happened in.
    func noteFailure(_ message: String) -> MigrationPhase {
        note("failed during \(phase.rawValue): \(message)")
        return phase
    }

    /// The report's fields every kind of migration fills the same way; the kind adds its own.
    func report(_ outcome: MigrationReport.Outcome, error: String?, failedPhase: MigrationPhase? = nil,
                source: MigrationReport.Side, destination: MigrationReport.Side) -> MigrationReport {
        let succeeded = outcome == .succeeded
        return MigrationReport(
            vm: vm, outcome: outcome, error: error, failedPhase: failedPhase?.rawValue, startedAt: startedAt,
            totalSeconds: clock.elapsed, transferSeconds: journal.transferSeconds(succeeded: succeeded, now: clock.elapsed),
            qemuDowntimeMilliseconds: succeeded ? journal.lastInfo?.downtimeMilliseconds : nil,
            switchoverMilliseconds: succeeded ? journal.switchoverMilliseconds : nil,
            qemuTransferredBytes: journal.lastInfo?.transferredBytes,
            streamBytes: 0, wireBytes: 0, retransmittedBytes: 0, throughputBitsPerSecond: nil,
            multifdChannels: 0, channels: [], nics: [],
            events: journal.events, timeline: journal.timeline,
            source: source, destination: destination,
            queuedSeconds: journal.queuedSeconds, queued: journal.queueSummary)
    }

    /// This process's side of the report: its CPU since the start and its peak RSS.
    func ferrySide(host: String, qemuCPUSeconds: Double?) -> MigrationReport.Side {
        .init(host: host, ferryCPUSeconds: ProcessStats.ownCPUSeconds() - ferryCPUStart,
              qemuCPUSeconds: qemuCPUSeconds, ferryPeakRSSBytes: ProcessStats.peakRSSBytes(pid: getpid()))
    }
}

/// The QEMU that holds the VM on this host while it moves out (the source QEMU of a
/// migration, the old QEMU of an update): its monitor, and what rolling back needs.
struct LocalQEMU {
    let qmp: QMPClient
    let pid: Int32
    /// The guest ran when the migration began (a paused VM stays paused after a rollback).
    let wasRunning: Bool
    let cpuStart: Double
    /// QEMU was told to migrate: a rollback must cancel that first.
    var migrateStarted = false
    /// QEMU's CPU when it was stopped for good (the report's figure).
    var cpuEnd: Double?

    /// QEMU's CPU seconds since the migration began.
    var cpuSeconds: Double? { (cpuEnd ?? ProcessStats.cpuSeconds(pid: pid)).map { $0 - cpuStart } }

    /// Attaches to the VM's QEMU and checks that it has no migration under way.
    /// `duringPostcopy`: the QEMU of a postcopy being resumed, whose migration is under way.
    static func attach(socket: String, pid: Int32, duringPostcopy: Bool = false) throws(QEMUFailure) -> LocalQEMU {
        let cpuStart = ProcessStats.cpuSeconds(pid: pid) ?? 0
        let qmp: QMPClient
        do {
            qmp = try QMPClient(path: socket)
        } catch {
            throw .unreachable(error)
        }
        let running: Bool
        let current: MigrationInfo
        do {
            running = try qmp.queryStatus().running
            current = try qmp.queryMigrate()
        } catch {
            throw .command(doing: "query the VM's QEMU", error)
        }
        if current.status.isInProgress && !duringPostcopy { throw .busy(current.status) }
        return LocalQEMU(qmp: qmp, pid: pid, wasRunning: running, cpuStart: cpuStart, migrateStarted: duringPostcopy)
    }

    /// The rollback both kinds of migration share: QEMU's migration cancelled if it was
    /// started, the guest resumed if it ran before. Returns what needed repair (nil:
    /// nothing) and whether the VM is safe (running, or paused as it was).
    func takeBack(_ track: MigrationRun, where place: String) -> (repair: String?, safe: Bool) {
        let done = qmp.takeBack(cancel: migrateStarted) { _ in wasRunning }
        if done.resumed {
            track.note("VM resumed" + place)
            return ("the VM was paused by the migration and runs again" + place, true)
        }
        // A QEMU that is gone has nothing to resume: the outcome says it died.
        if let error = done.resumeError, wasRunning, ProcessStats.isAlive(pid: pid) {
            return ("the VM may be paused" + place + " and could not be resumed: \(error)", false)
        }
        return (nil, true)
    }
}
