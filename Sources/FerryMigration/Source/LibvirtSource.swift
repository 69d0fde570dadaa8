import FerryIO
import FerryInterfaces
import FerryLibvirt
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation

/// What `ferry migrate DOMAIN --libvirt` asks of libvirt.
public struct LibvirtRequest: Sendable {
    /// The domain's name in the local libvirtd.
    public var domain: String
    /// The local libvirtd (`--libvirt-uri`).
    public var uri = LibvirtRequest.defaultURI
    public static let defaultURI = "qemu:///system"
    /// `--copy-storage`: libvirt copies every disk that is not shared (`VIR_MIGRATE_NON_SHARED_DISK`).
    public var copyStorage = false
    /// `--parallel N`: QEMU's parallel migration connections (nil: one stream).
    public var parallelConnections: Int?
    /// `--persistent`: the domain is defined on the destination too.
    public var persistent = false
    /// `--undefine-source`: the domain's definition leaves this host with it.
    public var undefineSource = false
    /// `--unsafe`: libvirt migrates even when it cannot tell the disks are shared.
    public var unsafe = false
    public init(domain: String) { self.domain = domain }

    /// libvirt's flags for this request: live, peer to peer, and what was asked.
    public var flags: MigrationFlags {
        var flags: MigrationFlags = [.live, .peerToPeer]
        if copyStorage { flags.insert(.nonSharedDisk) }
        if parallelConnections != nil { flags.insert(.parallel) }
        if persistent { flags.insert(.persistDestination) }
        if undefineSource { flags.insert(.undefineSource) }
        if unsafe { flags.insert(.unsafe) }
        return flags
    }

    /// The destination libvirtd as the source libvirtd reaches it: through Ferry's socket in
    /// `directory`, in the local URI's mode (system or session).
    public func destinationURI(directory: String) -> String {
        let mode = uri.contains("/session") ? "session" : "system"
        return "qemu+unix:///\(mode)?socket=\(directory)/libvirtd.sock"
    }

    /// libvirt's parameters: QEMU's streams and the disks go into Ferry's sockets, whose
    /// paths are those the destination QEMU listens on there (libvirt names one path for both).
    public func parameters(directory: String) -> MigrationParameters {
        var p = MigrationParameters()
        p.uri = "unix://\(directory)/\(LibvirtTarget.migration.socketName!)"
        if copyStorage { p.disksURI = "unix://\(directory)/\(LibvirtTarget.disks.socketName!)" }
        p.parallelConnections = parallelConnections.map { Int32($0) }
        return p
    }
}

/// The running `ferry migrate --libvirt` of a domain on this host: its pid, for `--cancel`
/// (`RUN/libvirt-DOMAIN.pid`, kept as a VM's ``RunningMigrationFile``), and beside it the
/// lock that keeps a second one from starting.
public struct LibvirtMigrationFile {
    public let path: String
    public init(runDirectory: String, domain: String) { path = runDirectory + "/libvirt-\(domain).pid" }
    var lockPath: String { path + ".lock" }

    /// The pid of a live `ferry migrate` named by the file.
    public var runningPID: Int32? { RunningMigrationFile.runningPID(path: path) }
}

/// libvirt's connections as the source carries them: Unix sockets in the session's
/// directory (root's alone), each connection accepted there a two-way stream to the
/// destination, opened in the order it was accepted.
final class LibvirtSockets: @unchecked Sendable {
    let directory: String
    private var listeners: [(LibvirtTarget, Socket)] = []
    private let nextStream = Locked(StreamID.firstTwoWay)
    /// Connections accepted, by target (for the report).
    let accepted = Locked<[LibvirtTarget: Int]>([:])

    init(directory: String) { self.directory = directory }

    /// Listens on the session's sockets: libvirtd's, QEMU's streams', and the disks' when copied.
    func listen(copyStorage: Bool) throws(MigrateError) {
        for target in LibvirtTarget.allCases where target != .disks || copyStorage {
            let path = directory + "/" + (target.socketName ?? "libvirtd.sock")
            do {
                let listener = try Socket.listenUnix(path: path)
                chmod(path, 0o600)
                listeners.append((target, listener))
            } catch {
                throw .libvirt("cannot listen on \(path): \(error)")
            }
        }
    }

    /// Accepts on every socket until ``close()``: each connection becomes a stream, opened
    /// here (what the destination writes back goes to it) and then announced. A failure is
    /// posted; the migration then ends.
    func start(dataPath: SourceDataPath, link: ControlLink, post: @escaping @Sendable (SourceMigration.Event) -> Void) {
        for (target, listener) in listeners {
            let thread = Thread { [self] in
                while true {
                    let socket: Socket
                    do {
                        guard let next = try listener.accept() else { continue }
                        socket = next
                    } catch {
                        return  // closed
                    }
                    let stream = nextStream.withLock { n -> UInt32 in defer { n += 1 }; return n }
                    guard StreamID.isTwoWay(stream) else {
                        socket.close()
                        post(.note("libvirt opened more connections than a session carries (\(StreamID.twoWayLimit))"))
                        continue
                    }
                    // libvirtd's own connection and the disks' go ahead of the bulk: libvirt's
                    // keepalives and the steps of its switchover wait on the first, and the
                    // pause waits for what the mirrors still owe.
                    let priority: UInt8 = target == .migration ? 0 : 1
                    do {
                        try dataPath.openTwoWay(stream: stream, socket: socket, priority: priority)
                        try link.send(.streamOpen, StreamOpenMessage(stream: stream, kind: .libvirt, target: target.rawValue, priority: priority))
                    } catch {
                        socket.close()
                        post(.note("cannot carry libvirt's \(target.rawValue) connection: \(error)"))
                        continue
                    }
                    accepted.withLock { $0[target, default: 0] += 1 }
                }
            }
            thread.name = "ferry-lv-\(target.rawValue)"
            thread.start()
        }
    }

    func close() {
        for (_, listener) in listeners {
            listener.shutdown()
            listener.close()
        }
        listeners = []
        LibvirtRun.removeDirectory(directory)
    }
}

extension SourceMigration {
    /// `ferry migrate DOMAIN --libvirt`: libvirt migrates the domain peer to peer and keeps
    /// the switchover; Ferry carries libvirt's connections (its control connection, QEMU's
    /// streams, the disk copies) between the hosts. Never throws: the report says what
    /// happened. The domain stays on this host whenever libvirt does not finish.
    public func runLibvirt(_ request: LibvirtRequest) -> MigrationReport {
        let libvirt: Libvirt
        let domain: Libvirt.Domain
        do {
            libvirt = try Libvirt.load()
            let connection: Libvirt.Connection
            do {
                connection = try libvirt.connect(request.uri)
            } catch {
                throw MigrateError.libvirt("cannot connect to libvirtd at \(request.uri): \(error.message)")
            }
            do {
                domain = try connection.domain(request.domain)
            } catch {
                throw MigrateError.libvirt("no domain '\(request.domain)' in \(request.uri): \(error.message)")
            }
            let state = try domain.state()
            guard state == .running || state == .paused else {
                throw MigrateError.libvirt("domain '\(request.domain)' is \(state), not running: only a running domain migrates live")
            }
        } catch {
            track.note("failed before anything moved: \(error)")
            return libvirtReport(.failedVMOnSource, error: "\(error)", request: request, sockets: nil)
        }
        try? FileManager.default.createDirectory(atPath: store.paths.runDirectory, withIntermediateDirectories: true)
        let file = LibvirtMigrationFile(runDirectory: store.paths.runDirectory, domain: request.domain)
        let lock: VMLock
        do {
            lock = try VMLock(path: file.lockPath, what: "domain '\(request.domain)'")
        } catch {
            let who = file.runningPID.map { " (ferry migrate, pid \($0))" } ?? ""
            return libvirtReport(.failedVMOnSource, error: "a migration of domain '\(request.domain)' is already running on this host\(who)",
                                 request: request, sockets: nil)
        }
        RunningMigrationFile.write(path: file.path)
        interrupt.startTimer(options.timeout)
        let directoryName = Hex.random(byteCount: 16)
        let sockets = LibvirtSockets(directory: LibvirtRun.directory(directoryName))
        let migration = LibvirtJob(domain: domain)
        defer {
            interrupt.end()
            outgoingSlot = nil
            closeTransport()
            sockets.close()
            RunningMigrationFile.remove(path: file.path)
            withExtendedLifetime(lock) {}
        }
        do {
            try carryLibvirt(request, domain: domain, directoryName: directoryName, sockets: sockets, job: migration)
            transport?.dataPath.markFinished()
            for stop in interrupt.lateRequests {
                track.note("\(stop.message) after libvirt finished: too late to stop, the migration completed")
            }
            return libvirtReport(.succeeded, error: nil, request: request, sockets: sockets, job: migration)
        } catch {
            let cause = interrupt.pending.map(MigrateError.stopped) ?? error
            let failedPhase = track.noteFailure(cause.description)
            // libvirt keeps the switchover: it is told to stop, and its own answer decides.
            // Its connections close first: QEMU 7.2 cannot cancel a parallel migration whose
            // sockets are stalled (its multifd threads block in send), and libvirt's abort
            // waits for QEMU without a limit.
            if let link {
                try? link.send(.abort, AbortMessage(reason: cause.description))
            }
            sockets.close()
            closeTransport()
            let libvirtError = migration.abortAndWait(timeout: .seconds(60))
            if let libvirtError, libvirtError.isEmpty == false { track.note("libvirt: \(libvirtError)") }
            if migration.succeeded {
                // libvirt finished before it heard the stop: the domain runs there.
                track.note("libvirt finished the migration before it could be stopped")
                return libvirtReport(.succeeded, error: nil, request: request, sockets: sockets, job: migration)
            }
            let state = try? domain.state()
            let here = state == .running || state == .paused
            var text = cause.description
            if case .libvirt = cause {} else if let libvirtError, !libvirtError.isEmpty { text += " (libvirt: \(libvirtError))" }
            text += here ? "; domain '\(request.domain)' is \(state!) on this host" : "; domain '\(request.domain)' is \(state.map { "\($0)" } ?? "unknown") on this host: see libvirt on both hosts"
            let outcome: MigrationReport.Outcome = !here ? .uncertain : (interrupt.pending == .cancelled ? .cancelled : .failedVMOnSource)
            return libvirtReport(outcome, error: text, request: request, sockets: sockets, job: migration, failedPhase: failedPhase)
        }
    }

    /// The steps: a session with the destination, its channels, the sockets libvirt
    /// connects to, then libvirt's migration, carried until libvirt returns.
    private func carryLibvirt(_ request: LibvirtRequest, domain: Libvirt.Domain, directoryName: String, sockets: LibvirtSockets,
                              job: LibvirtJob) throws(MigrateError) {
        try takeOutgoingSlot()
        let (control, welcome, security) = try connect()
        let session = try negotiateLibvirt(control, welcome: welcome, security: security, request: request, directoryName: directoryName)
        let link = openControlLink(control, session)
        try startDestination(link)
        let transport = try openChannels(session, control: control, twoWay: true)
        do {
            _ = try LibvirtRun.makeDirectory(directoryName)
        } catch {
            throw .libvirt("cannot make the migration directory here: \(error)")
        }
        try sockets.listen(copyStorage: request.copyStorage)
        sockets.start(dataPath: transport.dataPath, link: link, post: sessionSink())
        try move(to: .transferring)
        let destinationURI = request.destinationURI(directory: sockets.directory)
        track.note("libvirt migrates \(request.domain) peer to peer to \(destinationURI)" + (request.copyStorage ? ", copying its disks" : "")
            + (request.parallelConnections.map { ", \($0) parallel connections" } ?? ""))
        track.journal.migrateIssuedAt = track.elapsed
        let post = sessionSink()
        job.start(destinationURI: destinationURI, parameters: request.parameters(directory: sockets.directory), flags: request.flags) { error in
            post(.libvirtFinished(error))
        }
        var sampler = RateSampler()
        var lastPoll = -1.0
        var tuned = false
        while true {
            try interrupt.check()
            takeLinkNotes()
            if let event = events.next(timeout: .milliseconds(100)) {
                switch event {
                case .libvirtFinished(let error):
                    if let error { throw .libvirt("libvirt could not migrate \(request.domain): \(error)") }
                    try finishLibvirt(link: link, transport: transport, domain: domain)
                    return
                case .frame(let frame):
                    try handleLibvirtFrame(frame, transport: transport)
                case .controlLost(let why):
                    throw .controlLost(why)
                case .dataPath(.failed(let failure)):
                    throw .dataPath(failure)
                case .dataPath(.streamEnded(let end)):
                    do {
                        try link.send(.streamEnd, end)
                    } catch {
                        throw .controlLost("\(error)")
                    }
                case .dataPath(.channelFailed(let ch, let nic, let reason, let requeued)):
                    noteChannelFailed(ch, nic, reason, requeued)
                case .dataPath(.compression(let codec, let reason)):
                    track.note("compression: \(codec ?? "none") (\(reason))")
                case .dataPath(.channelUp):
                    break
                case .note(let text):
                    track.note(text)
                case .interrupted:
                    try interrupt.check()
                case .streamAccepted, .qemuStopped, .qemuStatus:
                    break
                }
            }
            guard track.elapsed - lastPoll >= 0.25 else { continue }
            lastPoll = track.elapsed
            if let stats = domain.jobStatistics(), stats.isActive {
                track.journal.lastInfo = stats.migrationInfo
                job.noteDisk(stats.diskProcessed)
                if !tuned {
                    // libvirt's job exists from here on: the limits it takes only while one runs.
                    tuned = true
                    do {
                        try domain.setMaxDowntime(milliseconds: UInt64(options.downtimeLimit.seconds * 1000))
                    } catch {
                        track.note("libvirt refused the downtime limit: \(error.message)")
                    }
                }
            }
            let bytes = transport.dataPath.streamByteCount
            let stats = transport.dataPath.channelStats
            track.journal.timeline.append(sampler.sample(now: track.elapsed, streamBytes: bytes, channels: stats))
            track.show(streamBytes: bytes, bitsPerSecond: sampler.bitsPerSecond, channels: stats,
                       interfaceBitsPerSecond: sampler.interfaceBitsPerSecond)
        }
    }

    /// libvirt finished: the domain runs at the destination. The destination is told, and
    /// answers with its account; the session ends.
    private func finishLibvirt(link: ControlLink, transport: SourceTransport, domain: Libvirt.Domain) throws(MigrateError) {
        track.journal.completedAt = track.elapsed
        if let stats = domain.jobStatistics(completed: true) {
            var info = stats.migrationInfo
            info.status = .completed
            track.journal.lastInfo = info
        }
        try move(to: .committing)
        track.note("libvirt finished: the domain runs at the destination")
        do {
            try link.send(.commit, CommitMessage())
        } catch {
            track.note("could not tell the destination that libvirt finished (\(error)); its session ends with the connection")
            try move(to: .done)
            return
        }
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            guard let event = events.next(timeout: .milliseconds(200)) else { continue }
            if case .frame(let frame) = event {
                if frame.type == .committed {
                    committed = try? ControlCoding.decode(CommittedMessage.self, from: frame)
                    break
                }
                try? handleLibvirtFrame(frame, transport: transport)
            }
            if case .controlLost = event { break }
        }
        try move(to: .done)
    }

    private func handleLibvirtFrame(_ frame: Frame, transport: SourceTransport) throws(MigrateError) {
        switch frame.type {
        case .streamEnd:
            _ = try endReverseHalf(frame)
        case .error:
            throw destinationFailure(frame)
        case .limit:
            applyLimit(frame, scheduler: transport.scheduler)
        case .status, .committed:
            break
        default:
            throw .protocolViolation("destination sent an unexpected \(frame.type) frame in a libvirt session")
        }
    }

    /// Step: the libvirt offer and the destination's answer.
    private func negotiateLibvirt(_ control: FrameConnection, welcome: WelcomeMessage, security: SessionSecurity,
                                  request: LibvirtRequest, directoryName: String) throws(MigrateError) -> NegotiatedSession {
        try move(to: .negotiating)
        destinationHost = "\(welcome.host) (\(options.host))"
        track.note("connected to \(welcome.host), protocol v\(welcome.version), \(welcome.software); security: \(security.summary)")
        guard welcome.version >= ProtocolVersion.libvirt else {
            control.shutdown()
            throw .libvirt("the destination's ferry speaks protocol v\(welcome.version); a libvirt migration needs v\(ProtocolVersion.libvirt) on both hosts (upgrade ferry there)")
        }
        let accept: AcceptMessage
        do {
            try control.send(.libvirtOffer, LibvirtOfferMessage(domain: request.domain, directory: directoryName, sourceHost: HostInfo.hostname,
                                                                linkTimeoutSeconds: options.linkTimeout.seconds, copyStorage: request.copyStorage,
                                                                parallelConnections: request.parallelConnections ?? 0))
            accept = try control.expect(.accept, as: AcceptMessage.self)
        } catch {
            control.shutdown()
            throw .refused(PeerFailure(error))
        }
        var bindKey = security.bindKey
        if security.keys == nil {
            guard let sent = Hex.decode(accept.bindKey), sent.count == 32 else {
                throw .protocolViolation("the destination sent a malformed bind key")
            }
            bindKey = sent
        }
        let session = NegotiatedSession(welcome: welcome, security: security, accept: accept,
                                        plan: StreamPlan(multifdChannels: request.parallelConnections ?? 0), bindKey: bindKey)
        self.session = session
        return session
    }

    private func libvirtReport(_ outcome: MigrationReport.Outcome, error: String?, request: LibvirtRequest, sockets: LibvirtSockets?,
                               job: LibvirtJob? = nil, failedPhase: MigrationPhase? = nil) -> MigrationReport {
        var r = report(outcome, error: error, spec: nil, failedPhase: failedPhase)
        let opened = sockets?.accepted.current ?? [:]
        r.libvirt = .init(domain: request.domain, uri: request.uri, copyStorage: request.copyStorage,
                          parallelConnections: request.parallelConnections, persistent: request.persistent,
                          undefineSource: request.undefineSource,
                          connections: LibvirtTarget.allCases.compactMap { t in opened[t].map { "\(t.rawValue) \($0)" } }.joined(separator: ", "),
                          memoryBytes: track.journal.lastInfo.map { $0.transferredBytes }, diskBytes: job?.diskBytes)
        r.multifdChannels = request.parallelConnections ?? 0
        return r
    }
}

/// libvirt's migration call, on a thread of its own (it blocks until libvirt is done),
/// and its abort from the migration's thread.
final class LibvirtJob: @unchecked Sendable {
    let domain: Libvirt.Domain
    private let state = Locked<(started: Bool, finished: Bool, error: String?)>((false, false, nil))
    /// The disk bytes libvirt reported last (for the report).
    var diskBytes: UInt64? { lastDisk.current }
    private let lastDisk = Locked<UInt64?>(nil)

    init(domain: Libvirt.Domain) { self.domain = domain }

    func noteDisk(_ bytes: UInt64?) {
        if let bytes { lastDisk.withLock { $0 = bytes } }
    }

    var succeeded: Bool { state.withLock { $0.finished && $0.error == nil } }

    func start(destinationURI: String, parameters: MigrationParameters, flags: MigrationFlags, done: @escaping @Sendable (String?) -> Void) {
        state.withLock { $0.started = true }
        let thread = Thread { [self] in
            var failure: String?
            do throws(Libvirt.Failure) {
                try domain.migrate(to: destinationURI, parameters: parameters, flags: flags)
            } catch {
                failure = error.message
            }
            state.withLock { $0.finished = true; $0.error = failure }
            done(failure)
        }
        thread.name = "ferry-libvirt"
        thread.start()
    }

    /// Aborts libvirt's job if it runs and waits for libvirt to return; libvirt's error (nil:
    /// never started or not done in time).
    func abortAndWait(timeout: Duration) -> String? {
        guard state.withLock({ $0.started }) else { return nil }
        if !state.withLock({ $0.finished }) { try? domain.abortJob() }
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let s = state.current
            if s.finished { return s.error }
            usleep(50_000)
        }
        return nil
    }
}

extension JobStatistics {
    /// libvirt's account as Ferry's display and report read QEMU's.
    var migrationInfo: MigrationInfo {
        var info = MigrationInfo(status: .active)
        info.transferredBytes = memoryProcessed ?? dataProcessed ?? 0
        info.remainingBytes = memoryRemaining ?? dataRemaining ?? 0
        info.totalBytes = memoryTotal ?? dataTotal ?? 0
        info.dirtyPagesRate = memoryDirtyRate ?? 0
        info.dirtySyncCount = memoryIteration ?? 0
        info.downtimeMilliseconds = downtimeMilliseconds.map { Double($0) }
        info.setupTimeMilliseconds = setupMilliseconds.map { Double($0) }
        info.totalTimeMilliseconds = elapsedMilliseconds.map { Double($0) }
        return info
    }
}
