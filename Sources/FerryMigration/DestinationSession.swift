import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Logging

/// The destination side of one migration, run by `ferry serve` on the control connection's
/// thread: checks the offer, receives boot files, starts QEMU waiting for the streams,
/// feeds it, and runs the VM only when the source commits.
final class DestinationSession: @unchecked Sendable {
    enum Event: Sendable {
        case frame(Frame)
        case controlLost(String)
        case dataFailed(TransportError)
        case qemuGone
    }

    let session = Hex.random(byteCount: 16)
    let security: SessionSecurity
    var bindKey: [UInt8] { security.bindKey }
    /// Channel numbers bound so far: a number is never bound twice in a session, so a
    /// recorded `bind` cannot be replayed and no nonce repeats (``FrameSeal``).
    private var boundChannels = Set<UInt32>()
    private let lock = NSLock()
    private let control: FrameConnection
    private let store: VMStore
    private let server: MigrationServer
    private let logger: Logger
    private let events = EventQueue<Event>()
    private let ferryCPUStart = ProcessStats.ownCPUSeconds()
    private var dataPath: DestinationDataPath?
    private var spec: VMSpec?
    private var qmp: QMPClient?
    private var qemuPID: Int32 = 0
    private var sourceHost = "?"
    private var committed = false
    /// `prepared` is on disk: from here the copy is the source's to run or discard, and a
    /// lost source leaves it paused for the reconciler (never discarded by us alone).
    private var prepared = false
    /// The source said `abort`: nothing will ever commit this copy.
    private var sourceAborted = false
    /// Held on the incoming VM while this session handles it, so the reconciler (and the
    /// answers to peers) leave it alone.
    private var vmLock: VMLock?
    /// The source daemon, for settling the switchover after a crash.
    private var sourceDaemon: (host: String, port: UInt16) = ("", 7470)

    init(control: FrameConnection, store: VMStore, server: MigrationServer, logger: Logger,
         security: SessionSecurity, sourceHost: String) {
        self.control = control
        self.security = security
        self.sourceHost = sourceHost
        self.store = store
        self.server = server
        var logger = logger
        logger[metadataKey: "peer"] = "\(control.peer)"
        self.logger = logger
    }

    var vmName: String? { spec?.name }

    /// Runs the session to its end; every failure is reported to the source and undone here.
    func run() {
        do {
            try handle()
        } catch {
            let (code, message) = classify(error)
            logger.warning("incoming migration failed", metadata: ["vm": "\(spec?.name ?? "?")", "error": "\(message)"])
            if prepared && !committed && !sourceAborted && ProcessStats.isAlive(pid: qemuPID) {
                // In doubt: the source may have decided to commit. The copy stays paused
                // with its `prepared` record; the reconciler asks the source.
                logger.warning("the VM stays loaded and paused until the source's decision is known",
                               metadata: ["vm": "\(spec?.name ?? "?")", "source": "\(sourceDaemon.host):\(sourceDaemon.port)"])
            } else if !committed {
                discardDestinationCopy(reason: message)
            }
            control.fail(code, message)
        }
        // QEMU's monitor takes one client at a time: let go of it before the lock, so
        // the reconciler can reach an in-doubt copy.
        qmp?.close()
        vmLock = nil
        dataPath?.stop()
        server.unregister(self)
        control.shutdown()
    }

    /// Claims a channel number for a binding connection; false if it was bound before.
    func claim(channel: UInt32) -> Bool {
        lock.withLock { boundChannels.insert(channel).inserted }
    }

    private func handle() throws {
        control.socket.setReceiveTimeout(.seconds(30))

        let first = try control.receiveChecked()
        if first.type == .resolve {
            // Not a migration: a peer settling a switchover a crash left unsettled.
            let request = try ControlCoding.decode(ResolveMessage.self, from: first)
            let answer = server.reconciler.answer(request)
            logger.info("settled a switchover for a peer", metadata: ["vm": "\(request.vm)", "asked": "\(request.decision?.rawValue ?? "query")", "answer": "\(answer.state.rawValue)"])
            try control.send(.resolved, answer)
            return
        }
        guard first.type == .offer else { throw WireError.unexpectedFrame(first.type, expected: "offer or resolve") }
        let offer = try ControlCoding.decode(OfferMessage.self, from: first)
        sourceDaemon = (Reconciler.host(ofPeer: control.peer), offer.sourcePort ?? 7470)
        try validate(offer)
        spec = offer.spec
        try server.register(self, name: offer.spec.name)

        let missing = offer.spec.bootFiles.filter { !store.bootFiles.has($0) }
        try control.send(.accept, AcceptMessage(session: session, bindKey: security.keys == nil ? Hex.encode(bindKey) : "",
                                                missingFiles: missing.map(\.sha256),
                                                interfaces: server.offeredInterfaces(), dataPort: server.port))
        logger.info("incoming migration accepted", metadata: ["vm": "\(offer.spec.name)", "from": "\(sourceHost)", "missingFiles": "\(missing.count)"])

        // Boot files, checked by hash.
        var receivers: [String: BootFileReceiver] = [:]
        for file in missing { receivers[file.sha256] = try BootFileReceiver(file: file, store: store.bootFiles) }
        while receivers.values.contains(where: { !$0.isComplete }) {
            let frame = try control.receiveChecked()
            if frame.type == .abort { throw ErrorMessage(code: .aborted, message: "the source aborted") }
            guard frame.type == .file else { throw WireError.unexpectedFrame(frame.type, expected: "file") }
            let piece = try FileChunkMessage.decode(frame.payload)
            guard let receiver = receivers[piece.sha256] else {
                throw ErrorMessage(code: .fileMismatch, message: "a boot file piece that was not asked for (\(piece.sha256.prefix(12)))")
            }
            do {
                try receiver.append(offset: piece.offset, bytes: piece.bytes)
            } catch {
                throw ErrorMessage(code: .fileMismatch, message: "\(error)")
            }
        }

        try waitForTurn(vm: offer.spec.name)

        // The destination QEMU, paused, waiting for its streams.
        let (record, qmp): (VMRecord, QMPClient)
        do {
            (record, qmp) = try store.start(spec: offer.spec, incoming: true, migratedFrom: sourceHost)
        } catch {
            throw ErrorMessage(code: .qemuFailed, message: "cannot start QEMU here: \(error)")
        }
        self.qmp = qmp
        qemuPID = record.state.pid
        vmLock = try? VMLock(paths: record.paths, name: offer.spec.name)
        do {
            try qmp.setMigrationCapabilities([("multifd", offer.streams.multifdChannels > 0), ("events", true)])
            if offer.streams.multifdChannels > 0 {
                try qmp.setMigrationParameters(["multifd-channels": .number(Double(offer.streams.multifdChannels))])
            }
            try qmp.execute("migrate-incoming", arguments: ["uri": .string("unix:\(record.paths.incomingSocket)")])
        } catch {
            throw ErrorMessage(code: .qemuFailed, message: "cannot prepare QEMU for the incoming migration: \(error)")
        }
        let incomingPath = record.paths.incomingSocket
        let dataPath = DestinationDataPath(
            streamCount: offer.streams.streamCount, cpus: server.options.cpus ?? CPUSet.automatic(), logger: logger,
            connector: { _ in
                let socket = try Socket.connectUnix(path: incomingPath)
                socket.setSendBuffer(ChunkPolicy.qemuSocketBufferByteCount)
                return socket
            },
            onFailure: { [events] error in events.post(.dataFailed(error)) })
        self.dataPath = dataPath
        control.socket.setReceiveTimeout(nil)
        try control.send(.ready, ReadyMessage(qemuVersion: qmp.qemuVersion))
        server.startedTransfer(self)

        startThread("ferry-control-rx") { [events, control] in
            while true {
                do {
                    events.post(.frame(try control.receive()))
                } catch {
                    events.post(.controlLost("\(error)"))
                    return
                }
            }
        }
        try receive(dataPath: dataPath, qmp: qmp, name: offer.spec.name)
    }

    /// Tells the source the most it may send (this host's share of its bandwidth).
    func sendLimit(_ bytesPerSecond: UInt64) {
        try? control.send(.limit, LimitMessage(bytesPerSecond: bytesPerSecond))
    }

    /// Attaches a data channel that has proven it belongs to this session.
    func attach(channel: Int, connection: FrameConnection) -> Bool {
        guard let dataPath else { return false }
        dataPath.addChannel(channel, connection: connection)
        return true
    }

    private func receive(dataPath: DestinationDataPath, qmp: QMPClient, name: String) throws {
        var loadedSent = false
        var lastPoll = 0.0
        let clock = Stopwatch()
        while true {
            let event = events.next(timeout: .milliseconds(100))
            switch event {
            case .frame(let frame)?:
                switch frame.type {
                case .streamOpen:
                    _ = try ControlCoding.decode(StreamOpenMessage.self, from: frame)
                case .streamEnd:
                    try dataPath.streamEnded(try ControlCoding.decode(StreamEndMessage.self, from: frame))
                case .abort:
                    let reason = (try? ControlCoding.decode(AbortMessage.self, from: frame))?.reason ?? "no reason"
                    sourceAborted = true
                    throw ErrorMessage(code: .aborted, message: "the source aborted: \(reason)")
                case .commit:
                    guard loadedSent else { throw ErrorMessage(code: .protocolViolation, message: "commit before the VM was loaded") }
                    try commit(qmp: qmp, name: name, dataPath: dataPath)
                    return
                case .error:
                    let msg = (try? ControlCoding.decode(ErrorMessage.self, from: frame))?.description ?? "error"
                    throw ErrorMessage(code: .aborted, message: "the source failed: \(msg)")
                case .status:
                    break
                default:
                    throw ErrorMessage(code: .protocolViolation, message: "unexpected \(frame.type) frame on the control connection")
                }
            case .controlLost(let why)?:
                throw ErrorMessage(code: .aborted, message: "lost the source (\(why))")
            case .dataFailed(let error)?:
                // Writing to QEMU failed (it died) or a peer broke the protocol.
                if case .aborted = error { throw ErrorMessage(code: .qemuFailed, message: "data path: \(error)") }
                throw ErrorMessage(code: .protocolViolation, message: "data path: \(error)")
            case .qemuGone?:
                throw ErrorMessage(code: .qemuFailed, message: "the destination QEMU exited")
            case nil:
                break
            }
            if !loadedSent && clock.elapsed - lastPoll >= 0.05 {
                lastPoll = clock.elapsed
                if qmp.isClosed || !ProcessStats.isAlive(pid: qemuPID) {
                    throw ErrorMessage(code: .qemuFailed, message: "the destination QEMU exited while loading the VM (see its qemu.log)")
                }
                if dataPath.isComplete {
                    let info = try qmp.queryMigrate()
                    if info.status == .completed {
                        // Durably `prepared` before the source may decide on it.
                        try record(.prepared, for: name)
                        prepared = true
                        FaultPoint.destinationAfterPrepared.pause()
                        try control.send(.loaded, LoadedMessage(receivedByteCount: dataPath.deliveredByteCount))
                        loadedSent = true
                        logger.info("VM loaded, waiting for the commit",
                                    metadata: ["vm": "\(name)", "chunks": "\(dataPath.chunkCount)", "spliced": "\(dataPath.splicedChunkCount)",
                                               "duplicates": "\(dataPath.duplicates)"])
                    } else if info.status == .failed {
                        throw ErrorMessage(code: .qemuFailed, message: "the destination QEMU failed to load the VM: \(info.errorDescription ?? "no reason")")
                    }
                }
            }
        }
    }

    private func commit(qmp: QMPClient, name: String, dataPath: DestinationDataPath) throws {
        // Durably `committed` before the VM runs: a crash from here on ends with it running here.
        try record(.committed, for: name)
        committed = true
        do {
            try qmp.execute("cont")
        } catch {
            // The record says committed and the source's copy is stopped for good: the
            // reconciler keeps trying to run this one.
            throw ErrorMessage(code: .qemuFailed, message: "the destination QEMU would not run the VM: \(error)")
        }
        try? store.setPhase(name, .running, session: session)
        store.clearHandover(name)
        let reply = CommittedMessage(
            ferryCPUSeconds: ProcessStats.ownCPUSeconds() - ferryCPUStart,
            qemuCPUSeconds: ProcessStats.cpuSeconds(pid: qemuPID) ?? 0,
            receivedByteCount: dataPath.receivedByteCount,
            ferryPeakRSSBytes: ProcessStats.peakRSSBytes(pid: getpid()) ?? 0)
        try? control.send(.committed, reply)
        logger.info("VM runs here now", metadata: ["vm": "\(name)", "from": "\(sourceHost)"])
        qmp.close()
    }

    /// Writes this session's handover record durably (see ``HandoverRecord``).
    private func record(_ decision: HandoverRecord.Decision, for name: String) throws {
        do {
            try store.recordHandover(name, HandoverRecord(session: session, role: .destination, decision: decision,
                                                          peerHost: sourceDaemon.host, peerPort: sourceDaemon.port))
        } catch {
            throw ErrorMessage(code: .internalError, message: "cannot record the switchover (\(decision.rawValue)) here: \(error)")
        }
    }

    private func validate(_ offer: OfferMessage) throws {
        let spec = offer.spec
        if let problem = VMSpec.validateName(spec.name) { throw ErrorMessage(code: .badOffer, message: problem) }
        if let existing = try? store.record(spec.name), existing.alive {
            throw ErrorMessage(code: .vmExists, message: "a VM named '\(spec.name)' already runs on \(HostInfo.hostname)")
        }
        guard spec.memoryMiB >= 16 && spec.memoryMiB <= 16 << 20 else {
            throw ErrorMessage(code: .badOffer, message: "memory of \(spec.memoryMiB) MiB is out of range")
        }
        guard spec.cpus >= 1 && spec.cpus <= 1024 else { throw ErrorMessage(code: .badOffer, message: "\(spec.cpus) vCPUs is out of range") }
        guard offer.streams.multifdChannels >= 0 && offer.streams.multifdChannels <= 64 else {
            throw ErrorMessage(code: .badOffer, message: "\(offer.streams.multifdChannels) multifd channels is out of range (0-64)")
        }
        if spec.accelerator == .kvm && !HostInfo.hasHardwareVirtualization {
            throw ErrorMessage(code: .badOffer, message: "the VM runs under KVM and \(HostInfo.hostname) cannot run KVM guests")
        }
        for file in spec.bootFiles {
            guard file.sha256.count == 64, Hex.decode(file.sha256) != nil, file.byteCount >= 0, file.byteCount < 4 << 30 else {
                throw ErrorMessage(code: .badOffer, message: "boot file \(file.name) has a malformed hash or size")
            }
        }
    }

    /// Before the commit, the destination copy is disposable: stop it and forget it.
    private func discardDestinationCopy(reason: String) {
        dataPath?.stop()
        guard let spec else { return }
        store.clearHandover(spec.name)
        if qemuPID > 0 {
            QEMU.stop(pid: qemuPID, qmp: qmp)
            store.archiveAndRemove(spec.name, reason: "incoming-aborted")
        }
    }

    private func classify(_ error: Error) -> (ErrorCode, String) {
        switch error {
        case let e as ErrorMessage: return (e.code, e.message)
        case let e as WireError: return (.protocolViolation, e.description)
        case let e as SocketError: return (.aborted, "connection to the source: \(e)")
        case let e as TransportError: return (.protocolViolation, e.description)
        default: return (.internalError, "\(error)")
        }
    }
}

// MARK: Waiting in line (`--max-migrations`)

extension DestinationSession {
    /// Waits for a place among the host's running migrations. Meanwhile the source hears its
    /// position every second in a `status` frame (which also keeps its wait for `ready`
    /// from timing out), and an `abort` or a lost connection ends the wait: the session
    /// leaves the line and nothing else was started.
    private func waitForTurn(vm: String) throws {
        let admission = server.admission
        admission.enqueue(session: session, vm: vm, source: sourceHost)
        let arrived = Stopwatch()
        var told = false
        while let place = admission.wait(session: session, timeout: told ? .seconds(1) : .milliseconds(1)) {
            let (position, length) = place
            if !told { logger.info("incoming migration waits in line", metadata: ["vm": "\(vm)", "position": "\(position)", "of": "\(length)"]) }
            told = true
            try control.send(.status, StatusMessage(
                text: "queued at \(HostInfo.hostname) (position \(position) of \(length), \(admission.limit) running at most)",
                queuePosition: position, queueLength: length, queuedSeconds: arrived.elapsed))
            if control.socket.waitReadable(timeout: .milliseconds(0)) {
                let frame = try control.receiveChecked()
                switch frame.type {
                case .abort:
                    let reason = (try? ControlCoding.decode(AbortMessage.self, from: frame))?.reason ?? "no reason"
                    throw ErrorMessage(code: .aborted, message: "the source gave up while queued: \(reason)")
                case .status:
                    continue
                default:
                    throw ErrorMessage(code: .protocolViolation, message: "unexpected \(frame.type) frame while queued")
                }
            }
        }
        // The report's peak RSS is this session's: the daemon's high-water mark starts
        // again here when no other migration runs beside this one (with others running,
        // it covers them too).
        if admission.runningCount == 1 { ProcessStats.resetPeakRSS() }
        if told {
            try control.send(.status, StatusMessage(text: "admitted after \(String(format: "%.1f", arrived.elapsed)) s in line",
                                                   queuePosition: 0, queueLength: 0, queuedSeconds: arrived.elapsed))
            logger.info("incoming migration admitted", metadata: ["vm": "\(vm)", "queuedSeconds": "\(String(format: "%.1f", arrived.elapsed))"])
        }
    }
}
