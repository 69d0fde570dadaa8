import FerryCompress
import FerryIO
import FerryInterfaces
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Logging

/// The source side of a network migration: drives the local QEMU, talks to the
/// destination's `ferry serve`, carries the streams, and decides the switchover.
///
/// It runs as a chain of named steps, each in its own phase (``PhaseGraph/networkSource``),
/// each taking what the one before produced:
///
/// ```
/// claim ─ queue ─ attach QEMU ─ connect ─ negotiate ─ boot files ─ start destination
///   ─ open channels ─ start QEMU ─ transfer ─┬─ commit ─ finish          (succeeded)
///                                            └─ (any failure before the commit point) roll back
/// ```
///
/// Threads: ``run()`` and every step run on the caller's thread, which owns all mutable
/// state here. The control reader, the data path, the stream acceptor, QEMU's event reader
/// and the stop switch run on threads of their own and reach this one only through
/// `events` (and ``stop(_:)`` through ``MigrationInterrupt``). `@unchecked Sendable` so
/// that `ferry migrate`'s signal handler may call ``stop(_:)``, which touches only the
/// interrupt (itself locked).
public final class SourceMigration: @unchecked Sendable {
    enum Event: Sendable {
        case frame(Frame)
        case controlLost(String)
        case dataPath(DataPathEvent)
        case streamAccepted(UInt32)
        /// QEMU paused the guest (its STOP event, QEMU's timestamp).
        case qemuStopped(at: Double)
        /// QEMU's migration changed state (its MIGRATION event, QEMU's timestamp).
        case qemuStatus(MigrationStatus, at: Double)
        case note(String)
        /// A stop (cancel, timeout) was granted: ``MigrationInterrupt``.
        case interrupted
        /// libvirt's migration call returned: nil when it succeeded, else libvirt's message.
        case libvirtFinished(String?)
    }

    let store: VMStore
    let name: String
    let options: MigrationOptions
    let logger: Logger
    let track: MigrationRun
    let events = EventQueue<Event>()
    let interrupt = MigrationInterrupt()

    // What the steps acquired, kept for the rollback, the teardown and the report.
    var qemu: LocalQEMU?
    var control: FrameConnection?
    /// The control connection once the offer is accepted: it may move to another NIC.
    var link: ControlLink?
    /// The link's notes, from its threads, for the journal (``takeLinkNotes()``).
    let linkNotes = Locked<[(Double, String)]>([])
    var session: NegotiatedSession?
    var transport: SourceTransport?
    var outgoingSlot: OutgoingSlot?
    /// The source QEMU's pid as claimed (known before its monitor is reached).
    var claimedPID: Int32 = 0
    /// "name (address)" once the handshake says who the destination is.
    var destinationHost: String
    /// Where the destination keeps each disk (its `accept`), for the report.
    var destinationDiskPaths: [String] = []
    /// The commit decision is on disk: the VM is the destination's from now on.
    var commitRecorded = false
    /// The commit record, written ahead and not yet in place.
    var stagedCommit: StagedHandover?
    var committed: CommittedMessage?
    /// The disks being copied (``copyDisks``), their mirrors' events, and whether the
    /// switchover has completed them.
    var diskCopies: [DiskCopy] = []
    let blockJobs = BlockJobWatch()
    var diskCopiesFinished = false
    var diskSampler = RateSampler()
    var lastDiskProgress = -1.0
    /// Each copied disk's convergence, by its index in the spec (the limits it set are in
    /// the journal, `diskWriteLimits`).
    var diskConvergence: [Int: DiskConvergence] = [:]
    /// What QEMU's throttle parameters were last set to (``steerConvergence``).
    var steeredThrottle: (initial: Int?, increment: Int?) = (nil, nil)
    /// QEMU's dirty syncs as seen so far, the throttle at the last poll, and the dirty rate
    /// measured over each pass with the throttle it ran at (``steerConvergence``).
    var throttleWatch: (sync: UInt64, throttle: Int, measurements: [ConvergencePolicy.Measurement]) = (0, 0, [])
    /// `--probe`: the guest's network as seen from here, from the claim to the report.
    var networkProbe: NetworkProbe?
    /// The switch to postcopy, once asked of QEMU (``considerPostcopy``), and when QEMU's
    /// first pass was seen to end (seconds since the start).
    var postcopy: PostcopyAccount?
    var firstPassEndedAt: Double?
    /// `ferry migrate --postcopy-now`: the operator asks for postcopy (set from a signal
    /// handler's thread; read by the migration's).
    let postcopyRequested = Locked(false)
    /// Counts the sessions of this migration: a postcopy resumed after its session was lost
    /// runs a new one (``resumePostcopy``), and the old one's threads may still report.
    let sessionGeneration = Locked(0)

    /// Posts the events of the current session only (see ``sessionGeneration``).
    func sessionSink() -> @Sendable (Event) -> Void {
        let mine = sessionGeneration.current
        return { [events, sessionGeneration] event in
            if sessionGeneration.current == mine { events.post(event) }
        }
    }

    public init(store: VMStore, name: String, options: MigrationOptions, logger: Logger,
                progress: @escaping @Sendable (MigrationProgress) -> Void) {
        self.store = store
        self.name = name
        self.options = options
        self.logger = logger
        self.destinationHost = "\(options.host):\(options.port)"
        track = MigrationRun(vm: name, graph: .networkSource, logger: logger, progress: progress)
        interrupt.onStop { [events] in events.post(.interrupted) }
    }

    /// Asks the migration to stop (`--cancel`, Ctrl-C, SIGTERM, a timeout): granted before
    /// the commit point (the VM stays here), refused after it (the migration completes).
    public func stop(_ request: StopRequest = .cancelled) -> StopAnswer {
        interrupt.request(request)
    }

    /// `ferry migrate --postcopy-now`: switch to postcopy at the next poll, if the migration
    /// may (`--postcopy allowed` and the destination agreed). nil if granted, else why not.
    public func requestPostcopy() -> String? {
        if postcopy != nil { return "the migration is in postcopy already" }
        guard options.postcopy == .allowed else { return "the migration was not started with --postcopy allowed" }
        if let plan = session?.plan, !plan.isPostcopy { return "postcopy is not possible with this destination or these disks (see the report's events)" }
        postcopyRequested.withLock { $0 = true }
        events.post(.note("the operator asked for postcopy (ferry migrate --postcopy-now)"))
        return nil
    }

    /// Answers a `ferry migrate --postcopy-now` for this migration's VM, if one is waiting
    /// (its request file); true if there was one.
    @discardableResult
    public func answerPostcopyRequest() -> Bool {
        let paths = store.vmPaths(name)
        guard FileManager.default.fileExists(atPath: paths.postcopyRequest) else { return false }
        try? FileManager.default.removeItem(atPath: paths.postcopyRequest)
        let answer = requestPostcopy() ?? "accepted"
        FileManager.default.createFile(atPath: paths.postcopyAnswer, contents: Data((answer + "\n").utf8))
        return true
    }

    /// Runs the migration to its end. Never throws: the report says what happened.
    public func run() -> MigrationReport {
        if let handover = postcopyHandover(), (try? store.record(name))?.state.phase == .migratingOut {
            return runResume(handover)
        }
        let claimed: (VMRecord, VMLock)
        do {
            claimed = try store.claimRunning(name)
        } catch {
            return report(.failedVMOnSource, error: error.description, spec: nil)
        }
        let (record, lock) = claimed
        claimedPID = record.state.pid
        RunningMigrationFile.write(record.paths)
        if let probe = options.probe {
            do { networkProbe = try NetworkProbe(probe) } catch { track.note("--probe: cannot probe \(probe.host): \(error)") }
        }
        interrupt.startTimer(options.timeout)
        defer {
            interrupt.end()
            outgoingSlot = nil
            RunningMigrationFile.remove(record.paths)
            withExtendedLifetime(lock) {}
        }
        do {
            try migrate(record)
            for stop in interrupt.lateRequests {
                track.note("\(stop.message) after the commit point: too late to stop, the migration completed")
            }
            return report(.succeeded, error: nil, spec: record.spec)
        } catch {
            if MigrationOutcome.isPastCommit(error, commitRecorded: commitRecorded) {
                // Past the recorded decision nothing rolls back: settle it with the destination.
                closeTransport()
                return settleAfterCommit(error.description, spec: record.spec)
            }
            // A granted stop is why, whatever it broke on the way (a read it cut short).
            let cause = interrupt.pending.map(MigrateError.stopped) ?? error
            let failedPhase = track.noteFailure(cause.description)
            let rollback = rollBack(reason: cause.description)
            var text = cause.description
            if let repair = rollback.repair { text += "; " + repair }
            let outcome = MigrationOutcome.of(cause, rollback.result)
            return report(outcome, error: text, spec: record.spec, failedPhase: failedPhase)
        }
    }

    /// The steps, in order (see the type's comment).
    private func migrate(_ record: VMRecord) throws(MigrateError) {
        try takeOutgoingSlot()
        var qemu = try attachQEMU(record)
        let (control, welcome, security) = try connect()
        let session = try negotiate(control, welcome: welcome, security: security, spec: record.spec)
        let link = openControlLink(control, session)
        try sendBootFiles(session.missingFiles, of: record.spec, over: link)
        try startDestination(link)
        let copies = Self.copiedDisks(record.spec, paths: record.paths)
        let transport = try openChannels(session, control: control, twoWay: !copies.isEmpty || session.plan.isPostcopy)
        try copyDisks(copies, spec: record.spec, transport: transport, qmp: qemu.qmp, link: link)
        try startQEMU(&qemu, transport: transport, plan: session.plan, paths: record.paths)
        try transfer(transport, plan: session.plan, link: link, qmp: qemu.qmp)
        try commit(session, link: link)
        if postcopy != nil {
            try finishResumingPostcopy(record, qemu: qemu, transport: transport, link: link, original: session.accept.session)
        }
        // A resumed postcopy finishes on the session that carried its end.
        finish(&qemu, transport: self.transport ?? transport, link: self.link ?? link)
    }

    /// Moves to the next phase; an illegal change is a bug, failed like any other error.
    func move(to phase: MigrationPhase) throws(MigrateError) {
        do {
            try track.move(to: phase, streamBytes: transport?.dataPath.streamByteCount ?? 0,
                         channels: transport?.dataPath.channelStats ?? [])
        } catch {
            throw .illegal(error)
        }
    }

    // MARK: Report

    func report(_ outcome: MigrationReport.Outcome, error: String?, spec: VMSpec?,
                failedPhase: MigrationPhase? = nil) -> MigrationReport {
        takeLinkNotes()
        let stats = transport?.dataPath.channelStats ?? []
        let streamBytes = transport?.dataPath.streamByteCount ?? 0
        var r = track.report(
            outcome, error: error, failedPhase: failedPhase,
            source: track.ferrySide(host: HostInfo.hostname, qemuCPUSeconds: qemu?.cpuSeconds),
            destination: .init(host: destinationHost, ferryCPUSeconds: committed?.ferryCPUSeconds,
                               qemuCPUSeconds: committed?.qemuCPUSeconds, ferryPeakRSSBytes: committed?.ferryPeakRSSBytes))
        r.streamBytes = streamBytes
        r.disks = diskReports(spec: spec, succeeded: outcome == .succeeded)
        r.destinationWaits = committed?.waits
        r.pause = outcome == .succeeded ? track.journal.pause : nil
        r.convergence = track.journal.convergence
        r.postcopy = postcopy
        r.wireBytes = stats.reduce(0) { $0 + $1.wireBytes }
        r.retransmittedBytes = transport?.scheduler.retransmittedBytes ?? 0
        r.throughputBitsPerSecond = r.transferSeconds.map { Double(streamBytes) * 8 / max($0, 0.001) }
        r.multifdChannels = session?.plan.multifdChannels ?? 0
        r.channels = stats.map { .init(channel: $0.channel, interface: $0.interface, payloadBytes: $0.payloadBytes, alive: $0.alive) }
        r.nics = (transport?.pairs ?? []).map {
            .init(interface: $0.localInterface, localAddress: $0.localAddress, remoteAddress: $0.remoteAddress,
                  speedBitsPerSecond: $0.speedBitsPerSecond)
        }
        r.security = session?.security.summary
        r.dataPath = transport?.summary
        r.compression = transport.map { t in
            MigrationReport.Compression(mode: t.compression.mode.description, periods: t.compression.periods().map {
                .init(codec: $0.codec?.description ?? "none", fromSeconds: $0.fromSeconds, toSeconds: $0.toSeconds)
            })
        }
        if let nics = spec?.nics, !nics.isEmpty {
            let times = committed?.times
            r.guestNICs = .init(nics: nics.enumerated().map { "eth\($0.offset) \($0.element.mac) on \($0.element.bridge)" },
                                connectedBeforeResumeMilliseconds: zip(times?.tapsConnected, times?.resumed).map { ($1 - $0) * 1000 },
                                announcedAfterResumeMilliseconds: zip(times?.resumed, times?.announced).map { ($1 - $0) * 1000 },
                                problem: committed?.networkProblem)
        }
        if let probe = networkProbe {
            // The guest's network must have come back (or the probe says it did not).
            if outcome == .succeeded { _ = probe.waitForAnswer(timeout: .seconds(3)) }
            r.network = probe.stop()
            networkProbe = nil
        }
        return r
    }
}

/// Both values, or nil.
private func zip<A, B>(_ a: A?, _ b: B?) -> (A, B)? {
    guard let a, let b else { return nil }
    return (a, b)
}
