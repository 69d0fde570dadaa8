import FerryIO
import FerryInterfaces
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation

/// What the handshake and the offer settled with the destination.
struct NegotiatedSession {
    let welcome: WelcomeMessage
    let security: SessionSecurity
    let accept: AcceptMessage
    let plan: StreamPlan
    /// What each data channel proves it belongs to the session with.
    let bindKey: [UInt8]
    var missingFiles: [String] { accept.missingFiles }
}

// MARK: Steps up to a destination QEMU waiting for the streams

extension SourceMigration {
    /// Step: the VM's QEMU, which must have no migration under way. Its STOP and MIGRATION
    /// events come to the event loop from here on.
    func attachQEMU(_ record: VMRecord, duringPostcopy: Bool = false) throws(MigrateError) -> LocalQEMU {
        let qemu: LocalQEMU
        do {
            qemu = try LocalQEMU.attach(socket: record.paths.qmpSocket, pid: record.state.pid, duringPostcopy: duringPostcopy)
        } catch {
            throw .qemu(error)
        }
        self.qemu = qemu
        qemu.qmp.eventHandler = { [events, blockJobs] event in
            switch event.name {
            case "STOP": events.post(.qemuStopped(at: event.timestamp))
            case _ where blockJobs.handle(event): break
            case "MIGRATION":
                if let status = event.data["status"]?.string {
                    events.post(.qemuStatus(MigrationStatus(qemuName: status), at: event.timestamp))
                }
            default: break
            }
        }
        return qemu
    }

    /// Step: the control connection to the destination's `ferry serve`, authenticated
    /// (both hosts prove the cluster key). A connection refused, reset or cut before the
    /// daemon's welcome (a daemon restarting, a burst of connections shed at its door) is
    /// tried again after 250 ms, 500 ms and 1 s (each ±25%), within `--timeout`; a refusal
    /// the daemon states (a wrong key, an unsupported version) is not.
    func connect() throws(MigrateError) -> (FrameConnection, WelcomeMessage, SessionSecurity) {
        try move(to: .connecting)
        var attempt = 0
        while true {
            do {
                return try connectOnce()
            } catch {
                attempt += 1
                guard attempt < Self.connectAttempts, Self.isTransient(error) else { throw error }
                let wait = Self.connectBackoff(attempt: attempt)
                track.note("cannot reach \(destinationHost) (\(error)); trying again in \(Int(wait * 1000)) ms")
                Thread.sleep(forTimeInterval: wait)
                try interrupt.check()
            }
        }
    }

    static let connectAttempts = 4

    /// The wait before attempt `attempt + 1`: 250 ms doubled each time, ±25%.
    static func connectBackoff(attempt: Int) -> Double {
        0.25 * Double(1 << min(attempt - 1, 4)) * Double.random(in: 0.75...1.25)
    }

    /// Failures of the network or of a daemon not (yet) answering: worth another try.
    static func isTransient(_ error: MigrateError) -> Bool {
        switch error {
        case .unreachable: return true
        case .handshake(_, .connection): return true
        default: return false
        }
    }

    private func connectOnce() throws(MigrateError) -> (FrameConnection, WelcomeMessage, SessionSecurity) {
        let control: FrameConnection
        do {
            let socket = try Socket.connectTCP(host: options.host, port: options.port, timeout: options.connectTimeout)
            socket.setUserTimeout(options.deadChannelTimeout)
            control = FrameConnection(socket: socket)
        } catch {
            throw .unreachable(destination: "\(options.host):\(options.port)", error)
        }
        self.control = control
        interrupt.attach(control)
        control.socket.setReceiveTimeout(.seconds(30))
        do {
            let (welcome, security) = try HandshakeRunner.source(control, keys: options.keys, host: HostInfo.hostname)
            return (control, welcome, security)
        } catch {
            control.shutdown()
            throw .handshake(destination: destinationHost, PeerFailure(error))
        }
    }

    /// Whether the migration may switch to postcopy: `--postcopy allowed`, a destination of
    /// protocol 6 that can take it (its welcome's `postcopyProblem`), and no disk being copied (the copies must be complete before the VM may
    /// run at the destination, and the mirrors complete only at the switchover's pause).
    /// Where `--converge postcopy` needs it and it cannot be had, the migration is refused
    /// here; under `auto` it goes on with the throttle alone.
    func postcopyPossible(_ spec: VMSpec, welcome: WelcomeMessage) throws(MigrateError) -> Bool {
        guard options.postcopy == .allowed else { return false }
        let version = welcome.version
        var problem: String?
        if let said = welcome.postcopyProblem {
            problem = "\(welcome.host) cannot take a postcopy migration: \(said)"
        } else if version < ProtocolVersion.postcopy {
            problem = "the destination's ferry speaks protocol v\(version); postcopy needs v\(ProtocolVersion.postcopy) on both hosts (upgrade ferry there)"
        } else if spec.disks.contains(where: { !$0.shared }) {
            problem = "postcopy is not available with disks being copied (their copies complete only at the switchover)"
        }
        guard let problem else { return true }
        if options.converge == .postcopy { throw .postcopy("--converge postcopy: " + problem) }
        track.note("postcopy allowed but not possible: \(problem); convergence goes on without it")
        return false
    }

    /// Step: the offer of the VM and the destination's answer: its NICs, the session, the
    /// boot files it lacks.
    /// `resuming`: the session id of a migration that committed into postcopy, whose rest
    /// this session carries (``resumePostcopy``).
    func negotiate(_ control: FrameConnection, welcome: WelcomeMessage, security: SessionSecurity,
                   spec: VMSpec, resuming: String? = nil) throws(MigrateError) -> NegotiatedSession {
        try move(to: .negotiating)
        destinationHost = "\(welcome.host) (\(options.host))"
        track.note("connected to \(welcome.host), protocol v\(welcome.version), \(welcome.software); security: \(security.summary)")

        let local = InterfaceDiscovery.list(speeds: options.nicSpeeds)
        let accept: AcceptMessage
        let plan: StreamPlan
        do {
            if resuming != nil {
                guard welcome.version >= ProtocolVersion.postcopyResume else {
                    throw MigrateError.postcopy("the destination's ferry speaks protocol v\(welcome.version); resuming a postcopy migration needs v\(ProtocolVersion.postcopyResume) (upgrade ferry there); the VM stays split between the hosts until it can be resumed")
                }
                plan = StreamPlan(multifdChannels: 0, postcopy: true)
            } else {
                plan = StreamPlan(multifdChannels: options.multifdChannels ?? StreamPolicy.multifdChannels(for: local, selection: options.nics),
                                  postcopy: try postcopyPossible(spec, welcome: welcome))
            }
            let ownPort = (try? String(contentsOfFile: store.paths.servePortFile, encoding: .utf8))
                .flatMap { UInt16($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            if !spec.nics.isEmpty && welcome.version < ProtocolVersion.guestNICs {
                throw MigrateError.nics("the destination's ferry speaks protocol v\(welcome.version); a VM with NICs needs v\(ProtocolVersion.guestNICs) on both hosts (upgrade ferry there)")
            }
            let tokens = resuming == nil ? try prepareDisks(spec, version: welcome.version) : nil
            try control.send(.offer, OfferMessage(spec: spec, streams: plan, sourceHost: HostInfo.hostname, sourcePort: ownPort,
                                                  linkTimeoutSeconds: options.linkTimeout.seconds, sharedDiskTokens: tokens,
                                                  diskAllocatedBytes: spec.disks.isEmpty ? nil
                                                      : spec.disks.map { DiskImage.allocatedBytes(path: $0.path) ?? $0.virtualSizeBytes },
                                                  resumeSession: resuming))
            accept = try control.expect(.accept, as: AcceptMessage.self)
        } catch let error as MigrateError {
            control.shutdown()
            throw error
        } catch {
            throw .refused(PeerFailure(error))
        }
        if !spec.disks.isEmpty {
            guard let paths = accept.diskPaths, paths.count == spec.disks.count else {
                throw .protocolViolation("the destination accepted a VM with disks without saying where it keeps them")
            }
            destinationDiskPaths = paths
        }
        var bindKey = security.bindKey
        if security.keys == nil {
            guard let sent = Hex.decode(accept.bindKey), sent.count == 32 else {
                throw .protocolViolation("the destination sent a malformed bind key")
            }
            bindKey = sent
        }
        let session = NegotiatedSession(welcome: welcome, security: security, accept: accept, plan: plan, bindKey: bindKey)
        self.session = session
        return session
    }

    /// Step: the boot files the destination lacks, each in pieces on the control connection.
    func sendBootFiles(_ missing: [String], of spec: VMSpec, over control: ControlLink) throws(MigrateError) {
        guard !missing.isEmpty else { return }
        try move(to: .sendingBootFiles)
        for sha in missing {
            try interrupt.check()
            guard let file = spec.bootFiles.first(where: { $0.sha256 == sha }) else {
                throw .protocolViolation("the destination asked for a file that is not the VM's (\(sha.prefix(12)))")
            }
            try sendBootFile(file, over: control)
        }
        track.note("sent \(missing.count) boot file(s)")
    }

    private func sendBootFile(_ file: BootFile, over control: ControlLink) throws(MigrateError) {
        let path = store.bootFiles.path(of: file)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .bootFile("boot file \(file.name) is missing from this host's store") }
        defer { close(fd) }
        // One buffer for every piece, its bytes read in place behind the header.
        let header = FileChunkMessage.headerByteCount
        var payload = [UInt8](repeating: 0, count: header + FileChunkMessage.maximumPieceByteCount)
        var offset: UInt64 = 0
        while true {
            let n = payload.withUnsafeMutableBytes { read(fd, $0.baseAddress! + header, FileChunkMessage.maximumPieceByteCount) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw .bootFile("reading \(file.name): \(errnoDescription(errno))") }
            if n == 0 { break }
            FileChunkMessage.writeHeader(sha256: file.sha256, offset: offset, into: &payload)
            do {
                try control.send(Frame(type: .file, payload: n == FileChunkMessage.maximumPieceByteCount ? payload : Array(payload[..<(header + n)])))
            } catch {
                throw .bootFile("sending \(file.name): \(error)")
            }
            offset += UInt64(n)
        }
    }

    /// Step: the destination starts its QEMU, waiting for the streams, perhaps only after
    /// holding the migration in line (`--max-migrations`), which its `status` frames tell.
    /// From its `ready` on, the destination's frames arrive as events.
    func startDestination(_ control: ControlLink) throws(MigrateError) {
        try move(to: .startingDestination)
        let ready = try waitForReady(control)
        // A libvirt session's destination names its libvirtd instead (its QEMU is libvirt's to start).
        track.note(ready.qemuVersion.hasPrefix("libvirtd") ? "destination ready: \(ready.qemuVersion)" : "destination QEMU \(ready.qemuVersion) waiting")
        let post = sessionSink()
        control.startPump("ferry-control", frame: { post(.frame($0)) }, lost: { post(.controlLost($0)) })
    }

    /// The destination's frames until `ready`: each must come within 60 s (in line, its
    /// `status` comes every second).
    private func waitForReady(_ control: ControlLink) throws(MigrateError) -> ReadyMessage {
        var line = QueueWatch()
        var deadline = ContinuousClock.now + .seconds(60)
        while true {
            let frame: Frame
            do {
                try interrupt.check()
                takeLinkNotes()
                guard let next = try control.receiveChecked(timeout: .milliseconds(500)) else {
                    guard ContinuousClock.now < deadline else {
                        throw SocketError("read from", peer: control.peer, kind: .timedOut)
                    }
                    continue
                }
                frame = next
                deadline = ContinuousClock.now + .seconds(60)
            } catch {
                try interrupt.check()
                throw .destinationCannotStart(PeerFailure(error))
            }
            switch frame.type {
            case .ready:
                try leaveLine(&line)
                do {
                    return try ControlCoding.decode(ReadyMessage.self, from: frame)
                } catch {
                    throw .protocolViolation("the destination sent a malformed ready: \(error)")
                }
            case .status:
                guard let status = try? ControlCoding.decode(StatusMessage.self, from: frame),
                      let position = status.queuePosition else { continue }
                if position == 0 {
                    try leaveLine(&line)
                    continue
                }
                let length = status.queueLength ?? position
                if line.firstPlace == nil {
                    line.firstPlace = (position, length)
                    line.since = track.elapsed - (status.queuedSeconds ?? 0)
                    track.note("queued at the destination: \(status.text)")
                }
                try move(to: .queued)
                track.show(note: "queued at the destination (position \(position) of \(length))",
                         queuePosition: position, queueLength: length)
            default:
                throw .protocolViolation("the destination sent an unexpected \(frame.type) frame before ready")
            }
        }
    }

    /// The destination's line, as its `status` frames tell it.
    private struct QueueWatch {
        var firstPlace: (Int, Int)?
        var since: Double?
    }

    private func leaveLine(_ line: inout QueueWatch) throws(MigrateError) {
        guard let since = line.since, let first = line.firstPlace else { return }
        let waited = track.elapsed - since
        track.journal.addQueued(waited, "at the destination (position \(first.0) of \(first.1) on arrival)")
        track.note(String(format: "admitted at the destination after %.1f s in line", waited))
        line.since = nil
        try move(to: .startingDestination)
    }

    /// Step (before any other): one of this host's outgoing slots
    /// (`FERRY_MAX_OUTGOING_MIGRATIONS`), waiting in line while all are held.
    func takeOutgoingSlot() throws(MigrateError) {
        let limit = OutgoingSlot.limitFromEnvironment
        let started = track.elapsed
        var firstPlace: (Int, Int)?
        var waitingShown = false
        try? FileManager.default.createDirectory(atPath: store.paths.runDirectory, withIntermediateDirectories: true)
        do {
            outgoingSlot = try OutgoingSlot.acquire(
                runDirectory: store.paths.runDirectory, limit: limit, vm: name,
                waiting: { position, length in
                    if firstPlace == nil {
                        firstPlace = (position, length)
                        track.note("queued on this host: \(limit) outgoing migration(s) at most (FERRY_MAX_OUTGOING_MIGRATIONS); position \(position) of \(length)")
                    }
                    if !waitingShown {
                        waitingShown = true
                        try? track.move(to: .queued)
                    }
                    track.show(note: "queued on this host (position \(position) of \(length))", queuePosition: position, queueLength: length)
                },
                check: { try interrupt.check() })
        } catch let error as MigrateError {
            throw error
        } catch {
            throw .store(doing: "take an outgoing slot", .io("\(error)"))
        }
        if let firstPlace {
            try move(to: .preparing)
            let waited = track.elapsed - started
            track.journal.addQueued(waited, "on this host (position \(firstPlace.0) of \(firstPlace.1) on arrival)")
            track.note(String(format: "took an outgoing slot after %.1f s in line", waited))
        }
    }
}
