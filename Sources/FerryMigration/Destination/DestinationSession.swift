import FerryIO
import FerryInterfaces
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Logging

/// Where an incoming migration stands (cloud-hypervisor's `ReceiveMigrationState` is the
/// model). What a failure does to the copy here depends on it alone: before `prepared`
/// the copy is disposable; at `prepared` only the source's decision may run or discard
/// it; from `committed` it runs here.
enum IncomingPhase: String, Sendable {
    /// The offer is checked and accepted.
    case offered
    case receivingBootFiles = "receiving-boot-files"
    /// Waiting for a place among the host's migrations (`--max-migrations`).
    case queued
    /// QEMU waits for its streams and loads what they bring.
    case loading
    /// `prepared` is on disk and `loaded` sent: the copy is the source's to run or discard,
    /// and a lost source leaves it paused for the reconciler (never discarded by us alone).
    case prepared
    /// `committed` is on disk: the VM runs here (or the reconciler makes it).
    case committed
    /// The source said `abort`: nothing will ever commit this copy.
    case aborted
    /// The rest of a postcopy migration whose session a daemon's crash ended: the VM runs
    /// here already (committed in that session) and its QEMU takes the pages it lacks. A
    /// failure leaves it as it is, for another resume.
    case resuming
    /// A libvirt migration: libvirt runs it, this host carries its connections until the
    /// source says libvirt finished (``runLibvirt(_:)``).
    case carrying

    static let graph = PhaseGraph<IncomingPhase>(next: [
        .offered: [.receivingBootFiles, .queued, .aborted, .resuming, .carrying],
        .carrying: [.committed, .aborted],
        .resuming: [.committed],
        .receivingBootFiles: [.queued, .aborted],
        .queued: [.loading, .aborted],
        .loading: [.prepared, .aborted],
        .prepared: [.committed, .aborted],
    ])
}

/// What ``MigrationServer/Options/onIncoming`` hears of an incoming migration.
public enum IncomingMigrationNotice: Sendable, Equatable {
    /// The offer was accepted.
    case started(vm: String)
    /// The session ended. `outcome` uses the report's words: succeeded (committed here),
    /// uncertain (left prepared, waiting for the source's decision), failed-vm-on-source
    /// (the copy here was discarded). `receivedBytesByInterface`: data channel payload per NIC.
    case ended(vm: String, outcome: String, seconds: Double, receivedBytesByInterface: [String: UInt64])
}

/// The destination side of one migration, run by `ferry serve` on the control connection's
/// thread: checks the offer, receives boot files, starts QEMU waiting for the streams,
/// feeds it, and runs the VM only when the source commits.
///
/// Threads: ``run()`` and its steps run on the control connection's thread, which owns
/// the phase and the QEMU fields. The control reader, the data path and QEMU's event
/// reader reach it through `events`. The server's threads call ``claim(channel:)``,
/// ``attach(channel:connection:)`` and ``sendLimit(_:)``: `@unchecked Sendable` because
/// those touch only `boundChannels` (under `lock`), `dataPath` (set once, before the
/// session is registered for channels) and the connection (whose sends are locked).
final class DestinationSession: @unchecked Sendable {
    enum Event: Sendable {
        case frame(Frame)
        case controlLost(String)
        case dataFailed(TransportError)
        /// The destination QEMU's migration changed state (its MIGRATION event, QEMU's timestamp).
        case qemuStatus(MigrationStatus, at: Double)
        /// Every stream has been written into QEMU.
        case streamsComplete
        /// A two-way stream's reverse half has been read to its end here (a disk copy's
        /// NBD server closed its side): the source is told.
        case reverseEnded(StreamEndMessage)
    }

    let session = Hex.random(byteCount: 16)
    let security: SessionSecurity
    var bindKey: [UInt8] { security.bindKey }
    /// Channel numbers bound so far: a number is never bound twice in a session, so a
    /// recorded `bind` cannot be replayed and no nonce repeats (``FrameSeal``).
    private var boundChannels = Set<UInt32>()
    private let lock = Monitor()
    /// The connection the source's hello came on; after `accept`, frames go through `link`.
    let control: FrameConnection
    /// The protocol version the handshake chose (v2: the control connection may move).
    let version: UInt16
    /// The control connection from `accept` on, set once on the session's thread (read
    /// under `lock` by the server's threads, which hand it rejoining connections).
    private var controlLink: ControlLink?
    var link: ControlLink? { lock.withLock { controlLink } }
    let store: VMStore
    let server: MigrationServer
    let logger: Logger
    let events = EventQueue<Event>()
    let ferryCPUStart = ProcessStats.ownCPUSeconds()
    var phase = PhaseMachine(IncomingPhase.graph, start: .offered)
    var dataPath: DestinationDataPath?
    var spec: VMSpec?
    var qmp: QMPClient?
    var qemuPID: Int32 = 0
    let sourceHost: String
    /// Held on the incoming VM while this session handles it, so the reconciler (and the
    /// answers to peers) leave it alone.
    var vmLock: VMLock?
    /// The source daemon, for settling the switchover after a crash.
    var sourceDaemon: (host: String, port: UInt16) = ("", 7470)
    /// The switchover's moments here, for the source's account of the pause.
    var times = DestinationSwitchoverTimes()
    /// QEMU's RESUME, from its event reader.
    let resumedAt = Locked<Double?>(nil)
    /// Records written ahead of the step that puts them in place.
    var staged: [HandoverRecord.Decision: StagedHandover] = [:]
    /// The VM's disks here (``IncomingDisks``).
    var disks = IncomingDisks()
    /// The source switched to postcopy and the device state is loaded here.
    var postcopy = false
    /// In postcopy after the commit (``finishPostcopy``): a resume of the same VM may
    /// supersede this session (read by the server's threads).
    let inPostcopy = Locked(false)
    /// With postcopy possible: what the guest's page faults waited.
    var faultClock: PostcopyFaultClock?

    init(control: FrameConnection, version: UInt16, store: VMStore, server: MigrationServer, logger: Logger,
         security: SessionSecurity, sourceHost: String) {
        self.control = control
        self.version = version
        self.security = security
        self.sourceHost = sourceHost
        self.store = store
        self.server = server
        var logger = logger
        logger[metadataKey: "peer"] = "\(control.peer)"
        self.logger = logger
    }

    var vmName: String? { spec?.name ?? libvirt?.accountName }
    /// A libvirt migration's session (``runLibvirt(_:)``).
    var libvirt: IncomingLibvirt?

    /// Read by the server's threads: the phase is the session thread's, so this is a
    /// snapshot, kept under `lock`.
    var isBeforePrepared: Bool { lock.withLock { beforePrepared } }
    private var beforePrepared = true

    /// When the offer was accepted (nil: it never was, as with a peer's `resolve`).
    var acceptedAt: ContinuousClock.Instant?

    /// Runs the session to its end; every failure is reported to the source and undone here.
    func run() {
        defer { noticeEnd() }
        do {
            try handle()
        } catch {
            let frame = error.frame
            logger.warning("incoming migration failed", metadata: ["vm": "\(spec?.name ?? "?")", "error": "\(frame.message)"])
            switch phase.current {
            case .prepared where ProcessStats.isAlive(pid: qemuPID):
                // In doubt: the source may have decided to commit. The copy stays paused
                // with its `prepared` record; the reconciler asks the source.
                logger.warning("the VM stays loaded and paused until the source's decision is known",
                               metadata: ["vm": "\(spec?.name ?? "?")", "source": "\(sourceDaemon.host):\(sourceDaemon.port)"])
            case .committed:
                break  // the record says committed: the reconciler keeps trying to run it
            case .resuming:
                // The VM runs here and needs the source's pages: another resume may bring them.
                logger.warning("the VM runs here and waits for its missing pages until the source resumes the migration",
                               metadata: ["vm": "\(spec?.name ?? "?")", "source": "\(sourceDaemon.host):\(sourceDaemon.port)"])
            default:
                discardDestinationCopy()
            }
            if let link {
                link.fail(frame.code, frame.message)
                link.drain(timeout: .milliseconds(500))
            } else {
                control.fail(frame.code, frame.message)
            }
        }
        // QEMU's monitor takes one client at a time: let go of it before the lock, so
        // the reconciler can reach an in-doubt copy.
        qmp?.close()
        vmLock = nil
        dataPath?.stop()
        for record in staged.values { record.discard() }
        server.unregister(self)
        link?.close()
        control.shutdown()
    }

    /// Tells `onIncoming` how the migration ended (after the session's own cleanup).
    private func noticeEnd() {
        guard let acceptedAt, let notify = server.options.onIncoming, let name = vmName else { return }
        let outcome: String
        switch phase.current {
        case .committed: outcome = "succeeded"
        case .prepared where ProcessStats.isAlive(pid: qemuPID): outcome = "uncertain"
        default: outcome = "failed-vm-on-source"
        }
        var perInterface: [String: UInt64] = [:]
        if let received = dataPath?.receivedBytesByLocalAddress, !received.isEmpty {
            let nics = InterfaceDiscovery.list(speeds: server.options.nicSpeeds)
            for (address, bytes) in received {
                let nic = nics.first { $0.addresses.contains { $0.address == address } }?.name ?? "unknown"
                perInterface[nic, default: 0] += bytes
            }
        }
        notify(.ended(vm: name, outcome: outcome, seconds: (ContinuousClock.now - acceptedAt).seconds,
                      receivedBytesByInterface: perInterface))
    }

    /// Claims a channel number for a binding connection; false if it was bound before.
    func claim(channel: UInt32) -> Bool {
        lock.withLock { boundChannels.insert(channel).inserted }
    }

    /// Tells the source the most it may send (this host's share of its bandwidth).
    func sendLimit(_ bytesPerSecond: UInt64) {
        try? link?.send(.limit, LimitMessage(bytesPerSecond: bytesPerSecond))
    }

    /// A connection that proved it continues this session's control connection (its
    /// `rejoin` is checked by the server): the link moves to it.
    func adoptControl(_ connection: FrameConnection, _ rejoin: RejoinMessage) throws(ControlLink.Failure) {
        guard let link else { throw .lost("the session has no control link yet") }
        try link.adopt(connection, rejoin: rejoin, answer: { [security, session] received in
            RejoinedMessage(generation: rejoin.generation, received: received,
                            proof: ControlRejoin.proof(bindKey: security.bindKey, session: session, generation: rejoin.generation,
                                                       received: received, role: .rejoined))
        }, secure: { [security] in security.secureControl($0, as: .destination, generation: rejoin.generation) })
        logger.info("control connection moved", metadata: ["vm": "\(spec?.name ?? "?")", "to": "\(connection.peer)",
                                                           "interface": "\(rejoin.interface)", "generation": "\(rejoin.generation)"])
    }

    /// The control connection becomes a link (see ``ControlLink``) once `accept` is sent.
    func openLink(_ offer: OfferMessage) -> ControlLink {
        openLink(linkTimeoutSeconds: offer.linkTimeoutSeconds)
    }

    func openLink(linkTimeoutSeconds: Double?) -> ControlLink {
        var options = ControlLink.Options(movable: version >= ProtocolVersion.movableControl)
        // The source gives up after its link timeout; this side waits a little longer,
        // so that it is the source that decides.
        options.rejoinTimeout = .milliseconds(Int64(((linkTimeoutSeconds ?? 10) + 5) * 1000))
        let link = ControlLink(control, role: .destination, options: options, path: control.peer,
                               note: { [logger] text in logger.notice("\(text)") })
        lock.withLock { controlLink = link }
        return link
    }

    /// The link, which exists from `accept` on (the steps that use it come after).
    var controlLinkOrFail: ControlLink {
        get throws(IncomingError) {
            guard let link else { throw .record("internal: no control link") }
            return link
        }
    }

    /// Attaches a data channel that has proven it belongs to this session.
    func attach(channel: Int, connection: FrameConnection) -> Bool {
        guard let dataPath else { return false }
        dataPath.addChannel(channel, connection: connection)
        return true
    }

    func move(to next: IncomingPhase) throws(IncomingError) {
        do {
            _ = try phase.move(to: next)
        } catch {
            throw .record(error.description)
        }
        let before = [.offered, .receivingBootFiles, .queued, .loading, .aborted].contains(next)
        lock.withLock { beforePrepared = before }
    }

    /// Talks to the source: any failure of the connection or its frames is the peer's.
    func peer<T>(_ body: () throws -> T) throws(IncomingError) -> T {
        do {
            return try body()
        } catch {
            throw .peer(PeerFailure(error))
        }
    }

    /// The steps: offer, boot files, a place in line, QEMU, the streams, the switchover.
    func handle() throws(IncomingError) {
        control.socket.setReceiveTimeout(.seconds(30))
        let first = try peer { try control.receiveChecked() }
        if first.type == .resolve {
            try answerResolve(first)
            return
        }
        if first.type == .hostQuery {
            try answerHostQuery(first)
            return
        }
        if first.type == .libvirtOffer {
            try runLibvirt(first)
            return
        }
        guard first.type == .offer else {
            throw .peer(.wire(.unexpectedFrame(first.type, expected: "offer or resolve")))
        }
        let offer = try peer { try ControlCoding.decode(OfferMessage.self, from: first) }
        if let original = offer.resumeSession {
            try resumePostcopy(offer, session: original)
            return
        }
        let missing = try accept(offer)
        try receiveBootFiles(missing)
        try waitForTurn(vm: offer.spec.name)
        let (qmp, dataPath) = try startQEMU(offer)
        try receive(dataPath: dataPath, qmp: qmp, name: offer.spec.name)
    }

    /// Not a migration: a peer settling a switchover a crash left unsettled.
    func answerResolve(_ frame: Frame) throws(IncomingError) {
        let request = try peer { try ControlCoding.decode(ResolveMessage.self, from: frame) }
        let answer = server.reconciler.answer(request)
        logger.info("settled a switchover for a peer", metadata: [
            "vm": "\(request.vm)", "asked": "\(request.decision?.rawValue ?? "query")", "answer": "\(answer.state.rawValue)",
        ])
        try peer { try control.send(.resolved, answer) }
    }

    /// Not a migration: a peer asking what this host has room for (`ferry drain`).
    func answerHostQuery(_ frame: Frame) throws(IncomingError) {
        guard version >= ProtocolVersion.hostQueries else {
            throw .peer(.wire(.unexpectedFrame(frame.type, expected: "offer or resolve (protocol v\(version))")))
        }
        let query = try peer { try ControlCoding.decode(HostQueryMessage.self, from: frame) }
        let info = server.hostInfo()
        logger.info("answered a host query", metadata: ["from": "\(sourceHost)", "purpose": "\(query.purpose)",
                                                        "free": "\(info.freeGuestMemoryBytes >> 20) MiB", "draining": "\(info.draining)"])
        try peer { try control.send(.hostInfo, info) }
    }

    /// Step: checks the offer, registers the VM's name, and accepts; returns the boot
    /// files this host lacks.
    func accept(_ offer: OfferMessage) throws(IncomingError) -> [BootFile] {
        sourceDaemon = (Reconciler.host(ofPeer: control.peer), offer.sourcePort ?? 7470)
        _ = server.supersedeAbandoned(vm: offer.spec.name, by: self)
        try validate(offer)
        // The spec as this host runs it: its disks where they are kept here.
        spec = try placeDisks(offer)
        if offer.streams.isPostcopy && !disks.copied.isEmpty {
            throw .refused(.badOffer, "postcopy with disks being copied is not supported: the copies must complete before the VM may run here")
        }
        try peer { try server.register(self, name: offer.spec.name, memoryMiB: offer.spec.memoryMiB) }
        let missing = offer.spec.bootFiles.filter { !store.bootFiles.has($0) }
        try sendAccept(missingFiles: missing.map(\.sha256), diskPaths: disks.paths)
        _ = openLink(offer)
        acceptedAt = .now
        server.options.onIncoming?(.started(vm: offer.spec.name))
        logger.info("incoming migration accepted", metadata: ["vm": "\(offer.spec.name)", "from": "\(sourceHost)", "missingFiles": "\(missing.count)"])
        return missing
    }

    /// `accept`: the session, this host's NICs and data port, the boot files it lacks and
    /// where it keeps each disk (none: no `diskPaths`).
    func sendAccept(missingFiles: [String], diskPaths: [String]) throws(IncomingError) {
        try peer {
            try control.send(.accept, AcceptMessage(session: session, bindKey: security.keys == nil ? Hex.encode(bindKey) : "",
                                                    missingFiles: missingFiles, interfaces: server.offeredInterfaces(), dataPort: server.port,
                                                    diskPaths: diskPaths.isEmpty ? nil : diskPaths))
        }
    }

    /// Step: the boot files this host lacks, each checked by its hash.
    func receiveBootFiles(_ missing: [BootFile]) throws(IncomingError) {
        guard !missing.isEmpty else { return }
        try move(to: .receivingBootFiles)
        var receivers: [String: BootFileReceiver] = [:]
        for file in missing {
            do {
                receivers[file.sha256] = try BootFileReceiver(file: file, store: store.bootFiles)
            } catch {
                throw .record("cannot store boot file \(file.name): \(error)")
            }
        }
        let link = try controlLinkOrFail
        while receivers.values.contains(where: { !$0.isComplete }) {
            guard let frame = try peer({ try link.receiveChecked(timeout: .seconds(30)) }) else {
                throw .peer(.other("no boot file piece from the source for 30 s"))
            }
            if frame.type == .abort {
                try move(to: .aborted)
                throw .sourceGone("the source aborted")
            }
            guard frame.type == .file else { throw .peer(.wire(.unexpectedFrame(frame.type, expected: "file"))) }
            let piece = try peer { try FileChunkMessage.decode(frame.payload) }
            guard let receiver = receivers[piece.sha256] else {
                throw .bootFile("a boot file piece that was not asked for (\(piece.sha256.prefix(12)))")
            }
            do {
                try receiver.append(offset: piece.offset, bytes: piece.bytes)
            } catch {
                throw .bootFile("\(error)")
            }
        }
    }

    /// Step: the destination QEMU, paused, waiting for its streams, and the data path that
    /// feeds it; `ready` tells the source to start.
    func startQEMU(_ offer: OfferMessage) throws(IncomingError) -> (QMPClient, DestinationDataPath) {
        try move(to: .loading)
        let spec = self.spec ?? offer.spec
        try createDiskImages(for: spec)
        let (record, started): (VMRecord, QMPClient)
        do {
            (record, started) = try store.start(spec: spec, incoming: true, migratedFrom: sourceHost)
        } catch {
            throw .qemu("cannot start QEMU here: \(error)")
        }
        qemuPID = record.state.pid
        vmLock = try? VMLock(paths: record.paths, name: offer.spec.name)
        // Postcopy: QEMU's monitor through a relay that outlives this daemon (``QMPRelay``),
        // so that a successor can resume the migration if this one crashes.
        let qmp = offer.streams.isPostcopy ? try relayQMP(started, paths: record.paths) : started
        self.qmp = qmp
        watch(qmp)
        do {
            // late-block-activate with disks: QEMU would take a shared image's locks (and
            // write access) as soon as it has loaded the VM, before the commit; a rollback
            // would then find the image held here when the source's QEMU takes it back.
            // With it, this QEMU takes its disks at `cont`, which runs only once committed.
            // (A copied disk's node is active already: its NBD export activated it.)
            // Postcopy: both QEMUs must have it on before the migration starts; the
            // blocktime is QEMU's account of what the guest waited for pages.
            let postcopy = offer.streams.isPostcopy
            try qmp.setMigrationCapabilities([("multifd", offer.streams.multifdChannels > 0), ("events", true),
                                              ("late-block-activate", !spec.disks.isEmpty),
                                              ("postcopy-ram", postcopy), ("postcopy-preempt", postcopy), ("postcopy-blocktime", postcopy)])
            if offer.streams.multifdChannels > 0 {
                try qmp.setMigrationParameters(["multifd-channels": .number(Double(offer.streams.multifdChannels))])
            }
            try qmp.execute("migrate-incoming", arguments: ["uri": .string("unix:\(record.paths.incomingSocket)")])
        } catch {
            throw .qemu("cannot prepare QEMU for the incoming migration: \(error)")
        }
        try serveDiskCopies(qmp, paths: record.paths)
        let dataPath = makeDataPath(offer.streams, incomingPath: record.paths.incomingSocket)
        self.dataPath = dataPath
        try announceReady(qmp)
        return (qmp, dataPath)
    }

    /// `ready` tells the source to start; from here its frames come as events.
    func announceReady(_ qmp: QMPClient) throws(IncomingError) {
        let link = try controlLinkOrFail
        try peer { try link.send(.ready, ReadyMessage(qemuVersion: qmp.qemuVersion)) }
        server.startedTransfer(self)
        link.startPump("ferry-control-rx", frame: { [events] in events.post(.frame($0)) },
                       lost: { [events] in events.post(.controlLost($0)) })
    }

    /// QEMU's MIGRATION and RESUME events, to the session's thread.
    func watch(_ qmp: QMPClient) {
        qmp.eventHandler = { [events, resumedAt] event in
            if event.name == "MIGRATION", let status = event.data["status"]?.string {
                events.post(.qemuStatus(MigrationStatus(qemuName: status), at: event.timestamp))
            }
            if event.name == "RESUME" { resumedAt.withLock { $0 = event.timestamp } }
        }
    }

    /// The data path that writes the streams into QEMU's socket at `incomingPath` (and,
    /// in postcopy, reads its return path back), with the fault clock postcopy keeps.
    func makeDataPath(_ streams: StreamPlan, incomingPath: String) -> DestinationDataPath {
        let dataPath = DestinationDataPath(
            streamCount: streams.streamCount, twoWay: !disks.copied.isEmpty, twoWayMigrationStreams: streams.isPostcopy,
            cpus: server.options.cpus ?? CPUSet.automatic(), logger: logger,
            connector: { _ in
                let socket = try Socket.connectUnix(path: incomingPath)
                socket.setSendBuffer(ChunkPolicy.qemuSocketBufferByteCount)
                return socket
            },
            onFailure: { [events] error in events.post(.dataFailed(error)) })
        dataPath.onComplete = { [events] in events.post(.streamsComplete) }
        if streams.isPostcopy {
            // Postcopy's page requests out of QEMU's return path, their pages into it on the
            // preempt channel: how long the guest's faults waited.
            let clock = PostcopyFaultClock()
            faultClock = clock
            let returnPath = StreamID.reverse(0)
            dataPath.reverse?.readObserver = { stream, bytes in if stream == returnPath { clock.requested(bytes) } }
            dataPath.writeObserver = { stream, bytes in if stream == StreamPlan.preemptStream { clock.delivered(bytes) } }
        }
        dataPath.onReverseEvent = { [events] event in
            switch event {
            case .streamEnded(let end): events.post(.reverseEnded(end))
            case .failed(let error): events.post(.dataFailed(error))
            default: break
            }
        }
        return dataPath
    }
}
