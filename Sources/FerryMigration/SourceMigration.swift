import FerryCompress
import FerryIO
import FerryInterfaces
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Logging

/// What the operator asks of one migration.
public struct MigrationOptions: Sendable {
    public var host: String
    public var port: UInt16
    /// QEMU multifd channels (0: one main stream only; nil: chosen by ``StreamPolicy``).
    /// QEMU's streams are what Ferry carries; more streams let QEMU use more than one
    /// core to send, at a cost in CPU.
    public var multifdChannels: Int?
    /// Data channels (TCP connections) per NIC pair: several, so that more than one core
    /// sends and receives (the RSS idea), and a lost connection costs a fraction of a NIC.
    public var channelsPerEndpoint: Int = 4
    /// This host's NICs that may carry data (default: all).
    public var nics: NICSelection = .all
    /// Link speeds where the kernel reports none (veth), by interface name.
    public var nicSpeeds: [String: UInt64] = [:]
    /// Cap on the migration's rate over all channels, bytes per second (nil: no cap).
    public var bandwidthBytesPerSecond: UInt64?
    /// With every NIC down, wait this long for one to come back before failing.
    public var linkTimeout: Duration = .seconds(10)
    /// A channel with data outstanding and no TCP acknowledgement for this long is dead.
    public var stallTimeout: Duration = .milliseconds(1000)
    /// The longest pause of the guest QEMU may plan for at switchover.
    public var downtimeLimit: Duration = .milliseconds(300)
    /// Give up (VM stays on the source) if the migration has not finished by then.
    public var timeout: Duration = .seconds(600)
    public var connectTimeout: Duration = .seconds(5)
    /// A connection with data unacknowledged by the peer's kernel this long is dead
    /// (TCP_USER_TIMEOUT): how fast a silently dead NIC is detected.
    public var deadChannelTimeout: Duration = .seconds(5)
    /// The cluster keys; the first is proven to the destination. nil: `--insecure`.
    public var keys: KeyRing?
    /// `--compress`: auto chooses by measurement while the migration runs.
    public var compression: CompressionMode = .auto
    /// `--zero-copy auto`: splice chunks from QEMU's socket to the data channels without
    /// copying them into Ferry's memory wherever Ferry need not see the bytes (an unsealed
    /// session with `--compress none`). false (`off`): always read and send them.
    public var zeroCopy = true
    /// `--cpus`: the cores the data path's threads run on (nil: the default choice).
    public var cpus: CPUSet?

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }
}

/// A snapshot for the progress display.
public struct MigrationProgress: Sendable {
    public var phase: MigrationPhase
    public var elapsedSeconds: Double
    public var qemu: MigrationInfo?
    public var streamBytes: UInt64
    /// Stream bytes per second over the last interval.
    public var bitsPerSecond: Double
    public var channels: [ChannelStats]
    /// Per-interface rate over the last interval.
    public var interfaceBitsPerSecond: [String: Double]
    public var note: String?
    /// While queued (at this host's outgoing limit or the destination's `--max-migrations`):
    /// the place in line (1 is next) and the line's length.
    public var queuePosition: Int? = nil
    public var queueLength: Int? = nil
}

/// The source side of a migration: drives the local QEMU, talks to the destination's
/// `ferry serve`, carries the streams, and decides the switchover.
public final class SourceMigration: @unchecked Sendable {
    enum Event: Sendable {
        case frame(Frame)
        case controlLost(String)
        case dataPath(DataPathEvent)
        case streamAccepted(UInt32)
        case qemu(QMPEvent)
        case note(String)
        /// A stop (cancel, timeout) was granted: ``MigrationInterrupt``.
        case interrupted
    }

    private let store: VMStore
    private let name: String
    private let options: MigrationOptions
    private let logger: Logger
    private let progress: @Sendable (MigrationProgress) -> Void
    private let events = EventQueue<Event>()
    private let clock = Stopwatch()
    private let startedAt = Date()
    private var reportEvents: [MigrationReport.Event] = []
    private var phase = MigrationPhase.preparing
    private var destinationHost: String

    private var qmp: QMPClient?
    private var control: FrameConnection?
    private var dataPath: SourceDataPath?
    private var listener: Socket?
    private var migrateStarted = false
    private var wasRunning = true
    private var qemuPID: Int32 = 0
    private var qemuCPUStart: Double = 0
    private let ferryCPUStart = ProcessStats.ownCPUSeconds()
    private var lastInfo: MigrationInfo?
    private var stopEventAt: Double?
    private var migrateIssuedAt: Double?
    private var completedAt: Double?
    private var committed: CommittedMessage?
    private var streamEnds: [UInt32: StreamEndMessage] = [:]
    private var channelManager: ChannelManager?
    private var pairs: [NICPair] = []
    private var destinationLimit: UInt64?
    private var timeline: [MigrationReport.Sample] = []
    private var multifdUsed = 0
    private var securitySummary: String?
    private var dataPathSummary: String?
    /// The commit decision is on disk: the VM is the destination's from now on.
    private var commitRecorded = false
    private var compression: CompressionController?
    private let interrupt = MigrationInterrupt()
    private var outgoingSlot: OutgoingSlot?
    private var queuedSeconds: Double?
    private var queueSummary: String?

    public init(store: VMStore, name: String, options: MigrationOptions, logger: Logger,
                progress: @escaping @Sendable (MigrationProgress) -> Void) {
        self.store = store
        self.name = name
        self.options = options
        self.logger = logger
        self.progress = progress
        self.destinationHost = "\(options.host):\(options.port)"
        interrupt.onStop { [events] in events.post(.interrupted) }
    }

    private func note(_ what: String) {
        reportEvents.append(.init(at: clock.elapsed, what: what))
        logger.info("\(what)", metadata: ["vm": "\(name)"])
    }

    // MARK: Running

    /// Runs the migration to its end. Never throws: the report says what happened.
    public func run() -> MigrationReport {
        let lock: VMLock
        let record: VMRecord
        do {
            (record, lock) = try store.claimRunning(name)
        } catch {
            return report(.failedVMOnSource, error: "\(error)", spec: nil)
        }
        _ = lock
        RunningMigrationFile.write(record.paths)
        defer { RunningMigrationFile.remove(record.paths) }
        interrupt.startTimer(options.timeout)
        defer {
            interrupt.end()
            outgoingSlot = nil
        }
        do {
            try takeOutgoingSlot()
            try migrate(record)
            noteLateStops()
            return report(.succeeded, error: nil, spec: record.spec)
        } catch let error as UncertainOutcome {
            cleanupTransport()
            return settleAfterCommit(error.message, spec: record.spec)
        } catch where commitRecorded {
            // Past the recorded decision nothing rolls back: settle it with the destination.
            cleanupTransport()
            return settleAfterCommit((error as? MigrationError)?.message ?? "\(error)", spec: record.spec)
        } catch {
            let stop = interrupt.pending
            let message = stop?.message ?? (error as? MigrationError)?.message ?? "\(error)"
            let failedPhase = phase
            note("failed during \(failedPhase.rawValue): \(message)")
            let recovery = rollBack(reason: message)
            var text = message
            if let recovery { text += "; " + recovery }
            var r = report(.failedVMOnSource, error: text, spec: record.spec)
            r.failedPhase = failedPhase.rawValue
            if recovery != nil && !(stillRunning()) { r.outcome = .uncertain }
            if qemuPID > 0 && !ProcessStats.isAlive(pid: qemuPID) { r.outcome = .vmDied }
            if stop == .cancelled && r.outcome == .failedVMOnSource { r.outcome = .cancelled }
            return r
        }
    }

    private struct UncertainOutcome: Error { var message: String }

    private func migrate(_ record: VMRecord) throws {
        let spec = record.spec
        qemuPID = record.state.pid
        qemuCPUStart = ProcessStats.cpuSeconds(pid: qemuPID) ?? 0

        // Our QEMU.
        let qmp: QMPClient
        do {
            qmp = try QMPClient(path: record.paths.qmpSocket)
        } catch {
            throw MigrationError(.preparing, "cannot talk to the VM's QEMU: \(error)")
        }
        self.qmp = qmp
        qmp.eventHandler = { [events] event in
            if event.name == "STOP" { events.post(.qemu(event)) }
        }
        let runState = try qmp.queryStatus()
        wasRunning = runState.running
        let current = try qmp.queryMigrate()
        if current.status.isInProgress {
            throw MigrationError(.preparing, "QEMU already has a migration in progress (\(current.status))")
        }

        // The destination.
        phase = .connecting
        emit()
        let control: FrameConnection
        do {
            let socket = try Socket.connectTCP(host: options.host, port: options.port, timeout: options.connectTimeout)
            socket.setUserTimeout(options.deadChannelTimeout)
            control = FrameConnection(socket: socket)
        } catch {
            throw MigrationError(.connecting, "cannot reach ferry serve at \(destinationHost): \(error)")
        }
        self.control = control
        interrupt.attach(control)
        control.socket.setReceiveTimeout(.seconds(30))
        phase = .negotiating
        let welcome: WelcomeMessage
        let security: SessionSecurity
        do {
            (welcome, security) = try HandshakeRunner.source(control, keys: options.keys, host: HostInfo.hostname)
        } catch {
            throw MigrationError(.negotiating, "handshake with \(destinationHost) failed: \(describe(error))")
        }
        securitySummary = security.summary
        destinationHost = "\(welcome.host) (\(options.host))"
        note("connected to \(welcome.host), protocol v\(welcome.version), \(welcome.software); security: \(security.summary)")

        let local = InterfaceDiscovery.list(speeds: options.nicSpeeds)
        let plan = StreamPlan(multifdChannels: options.multifdChannels ?? StreamPolicy.multifdChannels(for: local, selection: options.nics))
        multifdUsed = plan.multifdChannels
        let accept: AcceptMessage
        do {
            let ownPort = (try? String(contentsOfFile: store.paths.servePortFile, encoding: .utf8))
                .flatMap { UInt16($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            try control.send(.offer, OfferMessage(spec: spec, streams: plan, sourceHost: HostInfo.hostname, sourcePort: ownPort))
            accept = try control.expect(.accept, as: AcceptMessage.self)
        } catch {
            throw MigrationError(.negotiating, "the destination refused the VM: \(describe(error))")
        }
        var bindKey = security.bindKey
        if security.keys == nil {
            guard let sent = Hex.decode(accept.bindKey), sent.count == 32 else {
                throw MigrationError(.negotiating, "the destination sent a malformed bind key")
            }
            bindKey = sent
        }

        // Boot files the destination lacks.
        if !accept.missingFiles.isEmpty {
            phase = .sendingBootFiles
            emit()
            for sha in accept.missingFiles {
                try interrupt.check()
                guard let file = spec.bootFiles.first(where: { $0.sha256 == sha }) else {
                    throw MigrationError(.sendingBootFiles, "the destination asked for a file that is not the VM's (\(sha.prefix(12)))")
                }
                try sendBootFile(file, over: control)
            }
            note("sent \(accept.missingFiles.count) boot file(s)")
        }

        phase = .startingDestination
        emit()
        control.socket.setReceiveTimeout(.seconds(60))
        let ready = try waitForReady(control)
        note("destination QEMU \(ready.qemuVersion) waiting")
        control.socket.setReceiveTimeout(nil)

        // From here on, frames from the destination arrive as events.
        startThread("ferry-control") { [events] in
            while true {
                do {
                    let frame = try control.receive()
                    events.post(.frame(frame))
                } catch {
                    events.post(.controlLost("\(error)"))
                    return
                }
            }
        }

        // Data channels: pair our NICs with the destination's, then open channels on each pair.
        phase = .openingChannels
        emit()
        let scheduler = SendScheduler(noChannelGrace: options.linkTimeout)
        scheduler.setRateLimit(bytesPerSecond: options.bandwidthBytesPerSecond)
        let compression = CompressionController(
            mode: options.compression,
            cores: CompressionController.defaultCores(channels: max(1, options.channelsPerEndpoint) * max(1, accept.interfaces.count)),
            origin: clock.start)
        self.compression = compression
        let zeroCopy = options.zeroCopy && security.keys == nil && options.compression == .none && SourceDataPath.zeroCopyAvailable
        dataPathSummary = zeroCopy
            ? "zero-copy: spliced through pipes from QEMU's socket to the NICs, kept by reference until acknowledged"
            : "copied: read into pooled buffers" + (security.keys == nil ? "" : ", sealed at send time")
                + (options.compression == .none ? "" : ", compressed when it pays")
        let dataPath = SourceDataPath(scheduler: scheduler, compression: zeroCopy ? nil : compression, zeroCopy: zeroCopy, logger: logger) { [events] event in
            events.post(.dataPath(event))
        }
        dataPath.stallTimeout = options.stallTimeout
        dataPath.cpus = options.cpus ?? CPUSet.automatic()
        self.dataPath = dataPath
        let match = NICMatcher.match(local: local, remote: accept.interfaces.map(\.networkInterface), localSelection: options.nics)
        pairs = match.pairs
        let speeds = pairs.map(\.speedBitsPerSecond)
        compression.setLinkSpeed(bitsPerSecond: speeds.contains(nil) || speeds.isEmpty ? nil : speeds.compactMap { $0 }.reduce(0, +))
        if pairs.isEmpty {
            // No NIC pair found (e.g. loopback, or the peer hid its NICs): use the path the
            // control connection took.
            let localAddress = control.socket.localAddress ?? "0.0.0.0"
            pairs = [NICPair(localInterface: InterfaceDiscovery.name(holding: localAddress) ?? "default", localAddress: localAddress,
                             remoteInterface: "?", remoteAddress: options.host, speedBitsPerSecond: nil)]
        }
        note("NICs: " + pairs.map { p in
            "\(p.localInterface) \(p.localAddress) -> \(p.remoteAddress)" + (p.speedBitsPerSecond.map { " (\(Format.rate(Double($0))))" } ?? "")
        }.joined(separator: ", ") + (match.skipped.isEmpty ? "" : "; left out: " + match.skipped.joined(separator: ", ")))
        let manager = ChannelManager(
            plan: .init(pairs: pairs, port: accept.dataPort == 0 ? options.port : accept.dataPort, session: accept.session,
                        bindKey: bindKey, security: security, channelsPerPair: max(1, options.channelsPerEndpoint),
                        connectTimeout: min(options.connectTimeout, .seconds(2)), deadChannelTimeout: options.deadChannelTimeout),
            dataPath: dataPath, logger: logger, note: { [events] text in events.post(.note(text)) })
        channelManager = manager
        let openErrors = manager.openAll()
        guard scheduler.liveChannelCount > 0 else {
            throw MigrationError(.openingChannels, "no data channel could be opened: \(openErrors.joined(separator: "; "))")
        }
        manager.start()
        note("\(scheduler.liveChannelCount) data channel(s) bound over \(pairs.count) NIC pair(s)")

        // QEMU migrates into our sockets.
        phase = .transferring
        let uri: String
        if plan.streamCount == 1 {
            // One stream: QEMU gets its end of a socket pair (getfd, then `fd:`), made with
            // a large send buffer. A unix socket's writer is woken once three quarters of its
            // buffer has drained, and QEMU's own would be the 208 KiB default: QEMU and Ferry's
            // reader would then take turns every 150 KiB or so, two context switches each time.
            // With 4 MiB, QEMU writes ahead while Ferry sends, and Ferry reads whole chunks.
            // (A pipe instead, which the reader could splice from without the socket's
            // buffers, measured no better; docs/ARCHITECTURE.md, "Wake-ups".)
            do {
                let (ours, qemus) = try Socket.pair(name: "QEMU's migration stream")
                let size = qemus.setSendBuffer(ChunkPolicy.qemuSocketBufferByteCount)
                // getsockopt reports twice the room a writer gets (the kernel's bookkeeping).
                qemuStreamKind = "a socket pair, QEMU's send buffer \((size / 2) >> 10) KiB"
                defer { qemus.close() }  // QEMU holds its own copy once getfd returns
                try qmp.execute("getfd", arguments: ["fdname": .string(Self.qemuStreamName)], passing: qemus.fd)
                dataPath.addStream(0, socket: ours)
                events.post(.streamAccepted(0))
            } catch {
                throw MigrationError(.transferring, "cannot hand QEMU its migration stream: \(error)")
            }
            uri = "fd:\(Self.qemuStreamName)"
        } else {
            // QEMU 7.2 opens multifd channels only to socket addresses: it connects to ours.
            let listener: Socket
            do {
                listener = try Socket.listenUnix(path: record.paths.outgoingSocket)
            } catch {
                throw MigrationError(.transferring, "cannot listen for QEMU's streams: \(error)")
            }
            self.listener = listener
            startThread("ferry-accept") { [events, dataPath] in
                for id in 0..<UInt32(plan.streamCount) {
                    guard let socket = try? listener.accept() else { return }
                    dataPath.addStream(id, socket: socket)
                    events.post(.streamAccepted(id))
                }
            }
            uri = "unix:\(record.paths.outgoingSocket)"
        }
        try interrupt.check()
        try configure(qmp, plan: plan)
        FaultPoint.sourceSetup.pause()
        migrateIssuedAt = clock.elapsed
        do {
            try qmp.execute("migrate", arguments: ["uri": .string(uri)])
        } catch {
            if plan.streamCount == 1 { _ = try? qmp.execute("closefd", arguments: ["fdname": .string(Self.qemuStreamName)]) }
            throw MigrationError(.transferring, "QEMU refused to start the migration: \(error)")
        }
        migrateStarted = true
        try store.setPhase(name, .migratingOut)
        note("QEMU started migrating (main + \(plan.multifdChannels) multifd)" + (qemuStreamKind.map { ", into \($0)" } ?? ""))

        try transfer(plan: plan, control: control, scheduler: scheduler, qmp: qmp)

        // Switchover: everything is at the destination, QEMU there holds the VM paused.
        phase = .committing
        emit()
        // A cancel or timeout is still granted up to here, and refused from here on.
        try interrupt.passCommitPoint()
        FaultPoint.sourceBeforeCommit.pause()
        // The decision, on disk before it leaves: from here the VM belongs to the
        // destination, whatever crashes (docs/PROTOCOL.md, "Switchover and crashes").
        do {
            try store.recordHandover(name, HandoverRecord(session: accept.session, role: .source, decision: .commit,
                                                          peerHost: options.host, peerPort: options.port))
        } catch {
            throw MigrationError(.committing, "cannot record the commit decision: \(error)")
        }
        commitRecorded = true
        FaultPoint.sourceAfterCommitRecord.pause()
        do {
            try control.send(.commit, CommitMessage())
        } catch {
            throw UncertainOutcome(message: "cannot send the commit (\(error))")
        }
        // Past this point the destination may run the VM: never resume the source copy.
        while true {
            guard let event = events.next(timeout: .seconds(30)) else {
                throw UncertainOutcome(message: "no answer to the commit within 30 s; the source copy stays paused")
            }
            if case .frame(let frame) = event {
                if frame.type == .committed {
                    committed = try? ControlCoding.decode(CommittedMessage.self, from: frame)
                    break
                }
                if frame.type == .error {
                    // The destination refused to run it: it has discarded its copy.
                    let msg = (try? ControlCoding.decode(ErrorMessage.self, from: frame))?.description ?? "error"
                    throw MigrationError(.committing, "the destination could not start the VM: \(msg)")
                }
            } else if case .controlLost(let why) = event {
                throw UncertainOutcome(message: "lost the destination after the commit (\(why)); the source copy stays paused")
            }
        }
        let switchoverEnd = Date().timeIntervalSince1970
        if let stop = stopEventAt { switchoverMillis = (switchoverEnd - stop) * 1000 }
        note("VM runs on \(welcome.host)")
        FaultPoint.sourceAfterCommitted.pause()

        // The source copy is stopped for good. Its RAM file goes first, so that its pages
        // are freed by QEMU's exit rather than by Ferry's unlink.
        qemuCPUEnd = ProcessStats.cpuSeconds(pid: qemuPID)
        store.releaseMemory(name)
        QEMU.stop(pid: qemuPID, qmp: qmp, grace: .seconds(10))
        store.archiveAndRemove(name, reason: "migrated")
        channelManager?.stop()
        dataPath.closeChannels()
        try? control.send(.status, StatusMessage(text: "source stopped"))
        control.shutdown()
        phase = .done
        emit()
    }

    private var switchoverMillis: Double?
    private var qemuCPUEnd: Double?

    /// What QEMU's single stream was handed (nil: QEMU connected to Ferry's socket).
    private var qemuStreamKind: String?

    /// The name under which QEMU keeps the socket it migrates into (getfd).
    static let qemuStreamName = "ferry-migration"

    private func configure(_ qmp: QMPClient, plan: StreamPlan) throws {
        do {
            // x-ignore-shared off, explicitly: guest RAM is a shared memory backend (for
            // same-host updates), and across hosts it must be sent, not left out.
            try qmp.setMigrationCapabilities([("multifd", plan.multifdChannels > 0), ("events", true), ("x-ignore-shared", false)])
            var params: [String: JSONValue] = [
                // QEMU 7.2's default cap is 128 MiB/s. Ferry sets the pace (its window, its rate
                // limit across all channels, the links), so QEMU is left uncapped.
                "max-bandwidth": .number(100_000_000_000),
                "downtime-limit": .number(Double(options.downtimeLimit.milliseconds)),
            ]
            if plan.multifdChannels > 0 { params["multifd-channels"] = .number(Double(plan.multifdChannels)) }
            try qmp.setMigrationParameters(params)
        } catch {
            throw MigrationError(.transferring, "cannot configure QEMU's migration: \(error)")
        }
    }

    /// Watches QEMU and the data path until QEMU has sent everything and the destination
    /// has loaded it.
    private func transfer(plan: StreamPlan, control: FrameConnection, scheduler: SendScheduler, qmp: QMPClient) throws {
        let deadline = clock.elapsed + options.timeout.seconds
        var lastPoll = -1.0
        var loaded = false
        var qemuDone = false
        var lastBytes: UInt64 = 0
        var lastChannelBytes: [Int: UInt64] = [:]
        var lastSample = clock.elapsed
        var bits = 0.0
        var perNIC: [String: Double] = [:]
        while true {
            if clock.elapsed > deadline {
                throw MigrationError(.transferring, "timed out after \(Int(options.timeout.seconds)) s")
            }
            if let event = events.next(timeout: .milliseconds(100)) {
                switch event {
                case .frame(let frame):
                    switch frame.type {
                    case .loaded:
                        loaded = true
                        note("destination loaded the VM")
                    case .error:
                        let msg = (try? ControlCoding.decode(ErrorMessage.self, from: frame))?.description ?? "unreadable error"
                        throw MigrationError(phase, "destination: \(msg)")
                    case .status:
                        break
                    case .limit:
                        if let limit = try? ControlCoding.decode(LimitMessage.self, from: frame) {
                            destinationLimit = limit.bytesPerSecond
                            let effective = [options.bandwidthBytesPerSecond, limit.bytesPerSecond].compactMap { $0 }.min()
                            scheduler.setRateLimit(bytesPerSecond: effective)
                            note("destination limits this migration to " + (limit.bytesPerSecond.map { Format.rate(Double($0) * 8) } ?? "nothing"))
                        }
                    default:
                        throw MigrationError(phase, "destination sent an unexpected \(frame.type) frame")
                    }
                case .controlLost(let why):
                    throw MigrationError(phase, "lost the control connection to the destination: \(why)")
                case .dataPath(let e):
                    switch e {
                    case .channelUp: break
                    case .channelFailed(let ch, let nic, let reason, let requeued):
                        note("channel \(ch) on \(nic) failed (\(reason)); \(requeued) chunk(s) sent again on the others")
                    case .streamEnded(let end):
                        streamEnds[end.stream] = end
                        do {
                            try control.send(.streamEnd, end)
                        } catch {
                            throw MigrationError(phase, "lost the control connection: \(error)")
                        }
                        if streamEnds.count == plan.streamCount { scheduler.closeInput() }
                    case .failed(let failure):
                        throw MigrationError(phase, "data path: \(failure)")
                    case .compression(let codec, let reason):
                        note("compression: \(codec ?? "none") (\(reason))")
                    }
                case .note(let text):
                    note(text)
                case .interrupted:
                    try interrupt.check()
                case .qemu(let event):
                    if event.name == "STOP" && migrateStarted {
                        stopEventAt = event.timestamp
                        phase = .switchover
                        note("source VM paused for the switchover")
                    }
                case .streamAccepted(let id):
                    do {
                        try control.send(.streamOpen, StreamOpenMessage(stream: id))
                    } catch {
                        throw MigrationError(phase, "lost the control connection: \(error)")
                    }
                }
            }
            if clock.elapsed - lastPoll >= 0.25 || (qemuDone && !loaded) {
                if clock.elapsed - lastPoll >= 0.1 {
                    lastPoll = clock.elapsed
                    let info: MigrationInfo
                    do {
                        info = try qmp.queryMigrate()
                    } catch {
                        throw MigrationError(phase, "lost the VM's QEMU: \(error)")
                    }
                    lastInfo = info
                    switch info.status {
                    case .failed:
                        throw MigrationError(phase, "QEMU reports the migration failed: \(info.errorDescription ?? "no reason given")")
                    case .cancelled, .cancelling:
                        throw MigrationError(phase, "the migration was cancelled in QEMU")
                    case .completed:
                        if !qemuDone {
                            qemuDone = true
                            completedAt = clock.elapsed
                            note("source QEMU finished sending (\(Format.bytes(info.transferredBytes)) of RAM)")
                        }
                    default: break
                    }
                    let now = clock.elapsed
                    let bytes = dataPath?.streamByteCount ?? 0
                    let stats = dataPath?.channelStats ?? []
                    var perInterface: [String: UInt64] = [:]
                    for c in stats { perInterface[c.interface, default: 0] += c.payloadBytes }
                    timeline.append(.init(at: now, interfaceBytes: perInterface))
                    if now - lastSample >= 0.2 {
                        bits = Double(bytes - lastBytes) * 8 / (now - lastSample)
                        perNIC = [:]
                        for c in stats {
                            let delta = c.payloadBytes - (lastChannelBytes[c.channel] ?? 0)
                            perNIC[c.interface, default: 0] += Double(delta) * 8 / (now - lastSample)
                            lastChannelBytes[c.channel] = c.payloadBytes
                        }
                        lastBytes = bytes
                        lastSample = now
                    }
                    progress(MigrationProgress(phase: phase, elapsedSeconds: now, qemu: info, streamBytes: bytes,
                                               bitsPerSecond: bits, channels: stats, interfaceBitsPerSecond: perNIC, note: nil))
                }
            }
            if qemuDone && loaded && streamEnds.count == plan.streamCount {
                do {
                    try scheduler.waitUntilAllAcknowledged(timeout: .seconds(10))
                } catch {
                    throw MigrationError(phase, "\(error)")
                }
                dataPath?.markFinished()
                return
            }
        }
    }

    private func sendBootFile(_ file: BootFile, over control: FrameConnection) throws {
        let path = store.bootFiles.path(of: file)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw MigrationError(.sendingBootFiles, "boot file \(file.name) is missing from this host's store")
        }
        defer { close(fd) }
        // One buffer for every piece, its bytes read in place behind the header.
        let header = FileChunkMessage.headerByteCount
        var payload = [UInt8](repeating: 0, count: header + FileChunkMessage.maximumPieceByteCount)
        var offset: UInt64 = 0
        while true {
            let n = payload.withUnsafeMutableBytes { read(fd, $0.baseAddress! + header, FileChunkMessage.maximumPieceByteCount) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw MigrationError(.sendingBootFiles, "reading \(file.name): \(errnoDescription(errno))") }
            if n == 0 { break }
            FileChunkMessage.writeHeader(sha256: file.sha256, offset: offset, into: &payload)
            do {
                try control.send(Frame(type: .file, payload: n == FileChunkMessage.maximumPieceByteCount ? payload : Array(payload[..<(header + n)])))
            } catch {
                throw MigrationError(.sendingBootFiles, "sending \(file.name): \(error)")
            }
            offset += UInt64(n)
        }
    }

    // MARK: Failure

    /// Undoes a failed migration: the destination is told, QEMU's migration is cancelled,
    /// and the VM runs on the source again. Returns a note if something needed repair.
    private func rollBack(reason: String) -> String? {
        if let control {
            try? control.send(.abort, AbortMessage(reason: reason))
        }
        cleanupTransport()
        var repair: String?
        if let qmp, migrateStarted { qmp.cancelMigration(timeout: .seconds(15)) }
        if let qmp {
            if let state = try? qmp.queryStatus(), !state.running, wasRunning {
                do {
                    try qmp.execute("cont")
                    repair = "the source VM was paused by the migration and has been resumed"
                    note("source VM resumed")
                } catch {
                    repair = "the source VM is paused and could not be resumed: \(error)"
                }
            }
        }
        try? store.setPhase(name, .running, from: .migratingOut)
        return repair
    }

    /// The commit is recorded but the destination's answer was lost: ask its daemon (the
    /// same questions the reconciler asks) for up to 20 s. It runs the VM: the source copy
    /// is stopped, success. It has no copy: the source copy resumes. No answer: the source
    /// copy stays paused and `ferry serve` on this host settles it when it can.
    private func settleAfterCommit(_ why: String, spec: VMSpec) -> MigrationReport {
        note("\(why); settling the recorded commit with the destination")
        qmp?.close()  // QEMU's monitor takes one client at a time; the reconciler needs it
        let reconciler = Reconciler(store: store, keys: options.keys, logger: logger)
        let deadline = ContinuousClock.now + .seconds(20)
        var last = "no answer"
        while ContinuousClock.now < deadline {
            guard let record = try? store.record(name) else {
                note("the destination confirmed it runs the VM; the source copy is stopped")
                phase = .done
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

    private func stillRunning() -> Bool {
        guard let qmp, let state = try? qmp.queryStatus() else { return false }
        return state.running || !wasRunning
    }

    private func cleanupTransport() {
        channelManager?.stop()
        dataPath?.shutdown(reason: "migration ended")
        listener?.shutdown()
        listener?.close()
        control?.shutdown()
    }

    private func emit() {
        progress(MigrationProgress(phase: phase, elapsedSeconds: clock.elapsed, qemu: lastInfo,
                                   streamBytes: dataPath?.streamByteCount ?? 0, bitsPerSecond: 0,
                                   channels: dataPath?.channelStats ?? [], interfaceBitsPerSecond: [:], note: nil))
    }

    private func describe(_ error: Error) -> String {
        if let e = error as? ErrorMessage { return e.description }
        if let e = error as? SocketError { return e.description }
        if let e = error as? WireError { return e.description }
        if let e = error as? SecurityError { return e.description }
        return "\(error)"
    }

    // MARK: Report

    private func report(_ outcome: MigrationReport.Outcome, error: String?, spec: VMSpec?) -> MigrationReport {
        let stats = dataPath?.channelStats ?? []
        let streamBytes = dataPath?.streamByteCount ?? 0
        let transfer = (completedAt ?? (outcome == .succeeded ? clock.elapsed : nil)).flatMap { end in
            migrateIssuedAt.map { end - $0 }
        }
        let qemuCPU = (qemuCPUEnd ?? ProcessStats.cpuSeconds(pid: qemuPID)).map { $0 - qemuCPUStart }
        return MigrationReport(
            vm: name, outcome: outcome, error: error, failedPhase: nil, startedAt: startedAt,
            totalSeconds: clock.elapsed, transferSeconds: transfer,
            qemuDowntimeMilliseconds: outcome == .succeeded ? lastInfo?.downtimeMilliseconds : nil,
            switchoverMilliseconds: outcome == .succeeded ? switchoverMillis : nil,
            qemuTransferredBytes: lastInfo?.transferredBytes,
            streamBytes: streamBytes,
            wireBytes: stats.reduce(0) { $0 + $1.wireBytes },
            retransmittedBytes: dataPath?.scheduler.retransmittedBytes ?? 0,
            throughputBitsPerSecond: transfer.map { Double(streamBytes) * 8 / max($0, 0.001) },
            multifdChannels: multifdUsed,
            channels: stats.map { .init(channel: $0.channel, interface: $0.interface, payloadBytes: $0.payloadBytes, alive: $0.alive) },
            nics: pairs.map { .init(interface: $0.localInterface, localAddress: $0.localAddress, remoteAddress: $0.remoteAddress,
                                    speedBitsPerSecond: $0.speedBitsPerSecond) },
            events: reportEvents,
            timeline: timeline,
            source: .init(host: HostInfo.hostname, ferryCPUSeconds: ProcessStats.ownCPUSeconds() - ferryCPUStart,
                          qemuCPUSeconds: qemuCPU, ferryPeakRSSBytes: ProcessStats.peakRSSBytes(pid: getpid())),
            destination: .init(host: destinationHost, ferryCPUSeconds: committed?.ferryCPUSeconds,
                               qemuCPUSeconds: committed?.qemuCPUSeconds, ferryPeakRSSBytes: committed?.ferryPeakRSSBytes),
            security: securitySummary,
            dataPath: dataPathSummary,
            compression: compression.map { c in
                MigrationReport.Compression(mode: c.mode.description, periods: c.periods().map {
                    .init(codec: $0.codec?.description ?? "none", fromSeconds: $0.fromSeconds, toSeconds: $0.toSeconds)
                })
            },
            queuedSeconds: queuedSeconds,
            queued: queueSummary)
    }
}

/// How many QEMU streams a migration asks for.
public enum StreamPolicy {
    /// What one QEMU migration thread can fill. Ferry stripes even a single QEMU stream
    /// over every NIC, so multifd is only worth its CPU where one stream cannot keep up.
    /// Measured on the 2-core lab (QEMU 7.2, TCG, 1 GiB guest, 2 x 1 gbit): one stream
    /// 1.59 Gbit/s at 1.5 CPU-s of source QEMU, multifd 2 1.22 Gbit/s at 6.6 CPU-s, multifd
    /// 4 1.22 Gbit/s; QEMU alone over a local socket reached 1.66 Gbit/s with one stream and
    /// 1.55 with multifd 2. The field report puts one TCP stream at 4.5-5 Gbit/s per core;
    /// a Unix socket into Ferry is cheaper, so 10 Gbit/s per stream is the planning figure.
    public static let bitsPerSecondPerStream: UInt64 = 10_000_000_000

    /// One stream (multifd off) when this host's usable NICs add up to at most one
    /// stream's worth; otherwise a multifd channel per 10 Gbit/s (2 to 8). NICs whose
    /// speed the kernel does not report (veth, some virtual NICs) count as nothing: on the
    /// unlimited lab one stream also beat multifd 2 (1.64 against 1.48 Gbit/s).
    public static func multifdChannels(for nics: [NetworkInterface], selection: NICSelection) -> Int {
        let usable = nics.filter { !$0.isLoopback && $0.carrier && selection.allows($0.name) && $0.addresses.contains { !$0.isLinkLocal } }
        let total = usable.reduce(UInt64(0)) { $0 + ($1.speedBitsPerSecond ?? 0) }
        if total <= bitsPerSecondPerStream { return 0 }
        return min(8, max(2, Int((total + bitsPerSecondPerStream - 1) / bitsPerSecondPerStream)))
    }
}

public enum FerryVersion {
    public static let version = "0.1.0"
    public static let software = "ferry \(version)"
}

// MARK: Queueing and stopping

extension SourceMigration {
    /// Asks the migration to stop (`--cancel`, Ctrl-C, SIGTERM, a timeout): granted before
    /// the commit point (the VM stays here), refused after it (the migration completes).
    public func stop(_ request: StopRequest = .cancelled) -> StopAnswer {
        interrupt.request(request)
    }

    /// Takes one of this host's outgoing slots (`FERRY_MAX_OUTGOING_MIGRATIONS`), waiting
    /// in line while all are held.
    private func takeOutgoingSlot() throws {
        let limit = OutgoingSlot.limitFromEnvironment
        let started = clock.elapsed
        var firstPlace: (Int, Int)?
        try? FileManager.default.createDirectory(atPath: store.paths.runDirectory, withIntermediateDirectories: true)
        phase = .queued
        outgoingSlot = try OutgoingSlot.acquire(
            runDirectory: store.paths.runDirectory, limit: limit, vm: name,
            waiting: { position, length in
                if firstPlace == nil {
                    firstPlace = (position, length)
                    note("queued on this host: \(limit) outgoing migration(s) at most (FERRY_MAX_OUTGOING_MIGRATIONS); position \(position) of \(length)")
                }
                showQueued("queued on this host (position \(position) of \(length))", position, length)
            },
            check: { try interrupt.check() })
        phase = .preparing
        if let firstPlace {
            let waited = clock.elapsed - started
            addQueued(waited, "on this host (position \(firstPlace.0) of \(firstPlace.1) on arrival)")
            note(String(format: "took an outgoing slot after %.1f s in line", waited))
        }
    }

    /// Waits for `ready`: the destination starts QEMU, perhaps only after holding the
    /// migration in line (`--max-migrations`), which its `status` frames tell.
    private func waitForReady(_ control: FrameConnection) throws -> ReadyMessage {
        var firstPlace: (Int, Int)?
        var queuedSince: Double?
        func leaveLine() {
            if let since = queuedSince, let first = firstPlace {
                let waited = clock.elapsed - since
                addQueued(waited, "at the destination (position \(first.0) of \(first.1) on arrival)")
                note(String(format: "admitted at the destination after %.1f s in line", waited))
                queuedSince = nil
                phase = .startingDestination
                emit()
            }
        }
        while true {
            let frame: Frame
            do {
                try interrupt.check()
                frame = try control.receiveChecked()
            } catch let stop as StopError {
                throw stop
            } catch {
                try interrupt.check()
                throw MigrationError(phase, "the destination could not start QEMU: \(describe(error))")
            }
            switch frame.type {
            case .ready:
                leaveLine()
                do {
                    return try ControlCoding.decode(ReadyMessage.self, from: frame)
                } catch {
                    throw MigrationError(.startingDestination, "the destination sent a malformed ready: \(describe(error))")
                }
            case .status:
                guard let status = try? ControlCoding.decode(StatusMessage.self, from: frame),
                      let position = status.queuePosition else { continue }
                if position == 0 {
                    leaveLine()
                    continue
                }
                let length = status.queueLength ?? position
                if firstPlace == nil {
                    firstPlace = (position, length)
                    queuedSince = clock.elapsed - (status.queuedSeconds ?? 0)
                    note("queued at the destination: \(status.text)")
                }
                phase = .queued
                showQueued("queued at the destination (position \(position) of \(length))", position, length)
            default:
                throw MigrationError(.startingDestination, "the destination sent an unexpected \(frame.type) frame before ready")
            }
        }
    }

    private func addQueued(_ seconds: Double, _ where: String) {
        queuedSeconds = (queuedSeconds ?? 0) + seconds
        let text = String(format: "%.1f s ", seconds) + `where`
        queueSummary = queueSummary.map { $0 + "; " + text } ?? text
    }

    private func showQueued(_ text: String, _ position: Int, _ length: Int) {
        progress(MigrationProgress(phase: .queued, elapsedSeconds: clock.elapsed, qemu: nil, streamBytes: 0, bitsPerSecond: 0,
                                   channels: [], interfaceBitsPerSecond: [:], note: text,
                                   queuePosition: position, queueLength: length))
    }

    /// Stops asked for after the commit point were refused: the report says so.
    private func noteLateStops() {
        for stop in interrupt.lateRequests {
            note("\(stop.message) after the commit point: too late to stop, the migration completed")
        }
    }
}
