import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation

// The destination's later steps: the streams, `prepared`, the commit; and the checks and
// the waiting in line before them.
extension DestinationSession {
    /// Step: feeds QEMU until it has loaded the whole VM, records `prepared`, says
    /// `loaded`, and waits for the source's decision.
    func receive(dataPath: DestinationDataPath, qmp: QMPClient, name: String) throws(IncomingError) {
        var qemuCompleted = false
        var lastCheck = Stopwatch()
        while true {
            // Once QEMU has loaded everything, only the last stream's delivery is awaited;
            // after `loaded` the loop waits for the source's frames alone.
            let finishing = qemuCompleted && phase.current == .loading
            switch events.next(timeout: finishing ? .milliseconds(10) : .milliseconds(100)) {
            case .frame(let frame)?:
                if try handle(frame, dataPath: dataPath, qmp: qmp, name: name) { return }
            case .controlLost(let why)?:
                throw .sourceGone("lost the source (\(why))")
            case .dataFailed(let error)?:
                // Writing to QEMU failed (it died) or a peer broke the protocol.
                throw .dataPath(error)
            case .qemuStatus(let status, let at)?:
                if status == .failed { throw .qemu("the destination QEMU failed to load the VM: \(reason(qmp))") }
                if status == .completed {
                    qemuCompleted = true
                    times.loaded = at
                }
                if status == .postcopyActive && phase.current == .loading {
                    // The source switched to postcopy: the device state comes next, then
                    // QEMU waits paused (-S) with the rest of the memory still to come.
                    try awaitPostcopyLoad(qmp)
                    try prepare(dataPath, name: name, postcopy: true)
                }
            case .streamsComplete?:
                break
            case .reverseEnded(let end)?:
                let link = try controlLinkOrFail
                try peer { try link.send(.streamEnd, end) }
            case nil:
                break
            }
            guard phase.current == .loading else { continue }
            if lastCheck.elapsed >= 0.1 {
                lastCheck = Stopwatch()
                if qmp.isClosed || !ProcessStats.isAlive(pid: qemuPID) {
                    throw .qemu("the destination QEMU exited while loading the VM (see its qemu.log)")
                }
                // Should QEMU's event be missed, its own account settles it.
                if !qemuCompleted && dataPath.isComplete, let info = try? qmp.queryMigrate() {
                    if info.status == .failed {
                        throw .qemu("the destination QEMU failed to load the VM: \(info.errorDescription ?? "no reason")")
                    }
                    qemuCompleted = info.status == .completed
                    if qemuCompleted && times.loaded == nil { times.loaded = Date().timeIntervalSince1970 }
                }
            }
            // QEMU's MIGRATION event says it has loaded everything; the streams must have
            // delivered everything too (QEMU may finish before Ferry learns a stream ended).
            if qemuCompleted && dataPath.isComplete { try prepare(dataPath, name: name) }
        }
    }

    /// Postcopy: waits until QEMU has loaded the device state and stands paused (its run
    /// state leaves `inmigrate`; QEMU sends no event for it), polling every 2 ms.
    private func awaitPostcopyLoad(_ qmp: QMPClient) throws(IncomingError) {
        let started = Stopwatch()
        while true {
            let status: QEMURunStatus
            do {
                status = try qmp.queryStatus().status
            } catch {
                throw .qemu("the destination QEMU stopped answering while it loaded the device state: \(error)")
            }
            if status != .inmigrate { break }
            if let info = try? qmp.queryMigrate(), info.status == .failed {
                throw .qemu("the destination QEMU failed to load the VM: \(info.errorDescription ?? "no reason")")
            }
            guard started.elapsed < 60 else { throw .qemu("the destination QEMU did not load the device state within 60 s of postcopy") }
            usleep(2000)
        }
        times.loaded = Date().timeIntervalSince1970
        postcopy = true
    }

    /// QEMU's reason for a failed incoming migration.
    private func reason(_ qmp: QMPClient) -> String {
        (try? qmp.queryMigrate())?.errorDescription ?? "no reason"
    }

    /// One control frame from the source; true once the VM runs here.
    private func handle(_ frame: Frame, dataPath: DestinationDataPath, qmp: QMPClient, name: String) throws(IncomingError) -> Bool {
        switch frame.type {
        case .streamOpen:
            let open = try peer { try ControlCoding.decode(StreamOpenMessage.self, from: frame) }
            // QEMU's streams need nothing here: they connect in order as their bytes come.
            // A two-way stream connects only to what the session set up for it (a disk
            // copy's NBD server).
            if let kind = open.kind, kind != .migration { try openDiskStream(open, dataPath: dataPath) }
        case .streamEnd:
            let end = try peer { try ControlCoding.decode(StreamEndMessage.self, from: frame) }
            // QEMU has sent everything: the switchover is near.
            if !StreamID.isTwoWay(end.stream) { stage(.prepared, for: name) }
            try endStream(end, dataPath: dataPath)
        case .abort:
            throw try sourceAborted(frame)
        case .commit:
            times.commitReceived = Date().timeIntervalSince1970
            guard phase.current == .prepared else { throw .protocolViolation("commit before the VM was loaded") }
            try commit(qmp: qmp, name: name, dataPath: dataPath)
            if postcopy { try finishPostcopy(dataPath: dataPath, qmp: qmp, name: name) }
            return true
        case .error:
            throw sourceFailed(frame)
        case .status:
            break
        default:
            throw .protocolViolation("unexpected \(frame.type) frame on the control connection")
        }
        return false
    }

    /// The source's `streamEnd`: the half has ended, and its direction of the local socket
    /// closes once every chunk is written.
    func endStream(_ end: StreamEndMessage, dataPath: DestinationDataPath) throws(IncomingError) {
        do {
            try dataPath.streamEnded(end)
        } catch {
            throw .dataPath((error as? TransportError) ?? .protocolViolation("\(error)"))
        }
    }

    /// The source's `abort`: nothing will ever commit this session; the error it ends with.
    func sourceAborted(_ frame: Frame) throws(IncomingError) -> IncomingError {
        let reason = (try? ControlCoding.decode(AbortMessage.self, from: frame))?.reason ?? "no reason"
        try move(to: .aborted)
        return .sourceGone("the source aborted: \(reason)")
    }

    /// The source's `error`, as the error the session ends with.
    func sourceFailed(_ frame: Frame) -> IncomingError {
        .sourceGone("the source failed: \((try? ControlCoding.decode(ErrorMessage.self, from: frame))?.description ?? "error")")
    }

    /// `prepared`, durably, before the source may decide on it; then `loaded`.
    /// `postcopy`: the device state is loaded, the memory still coming.
    private func prepare(_ dataPath: DestinationDataPath, name: String, postcopy: Bool = false) throws(IncomingError) {
        times.lastByte = postcopy ? Date().timeIntervalSince1970 : dataPath.completionTime
        // The disk copies are complete (the source completed its mirrors before it sent the
        // device state QEMU has just loaded): no more writes come through the NBD server.
        if let qmp { try stopServingDisks(qmp, dataPath: dataPath) }
        times.prepareStarted = Date().timeIntervalSince1970
        try record(.prepared, for: name)
        times.prepared = Date().timeIntervalSince1970
        try move(to: .prepared)
        FaultPoint.destinationAfterPrepared.pause()
        let link = try controlLinkOrFail
        try peer { try link.send(.loaded, LoadedMessage(receivedByteCount: dataPath.deliveredByteCount, postcopy: postcopy)) }
        stage(.committed, for: name)
        logger.info("VM loaded, waiting for the commit",
                    metadata: ["vm": "\(name)", "chunks": "\(dataPath.chunkCount)", "spliced": "\(dataPath.splicedChunkCount)",
                               "duplicates": "\(dataPath.duplicates)"])
    }

    /// Step: `committed`, durably, then the VM runs here.
    private func commit(qmp: QMPClient, name: String, dataPath: DestinationDataPath) throws(IncomingError) {
        // Durably `committed` before the VM runs: a crash from here on ends with it running here.
        try record(.committed, for: name)
        try move(to: .committed)
        times.committedRecorded = Date().timeIntervalSince1970
        // The VM's taps join its network now, not before: until the commit was recorded,
        // a rollback could still give the VM back to the source.
        let nics = spec?.nics ?? []
        var nicProblem: String?
        if !nics.isEmpty {
            do { try GuestNICs.connect(nics) } catch { nicProblem = "\(error)" }
            times.tapsConnected = Date().timeIntervalSince1970
        }
        do {
            try qmp.execute("cont")
            // QEMU sends RESUME before cont's answer, and its reader has handed it over by now.
            times.resumed = resumedAt.withLock { $0 } ?? Date().timeIntervalSince1970
        } catch {
            // The record says committed and the source's copy is stopped for good: the
            // reconciler keeps trying to run this one.
            throw .qemu("the destination QEMU would not run the VM: \(error)")
        }
        if !nics.isEmpty {
            // The switches learn the guest's new port (QEMU's own announcement at load went
            // to a tap on no bridge).
            do { try GuestNICs.announce(qmp) } catch { nicProblem = (nicProblem.map { $0 + "; " } ?? "") + "announce-self: \(error)" }
            times.announced = Date().timeIntervalSince1970
            if let nicProblem { logger.warning("the VM runs, but its network may not reach it", metadata: ["vm": "\(name)", "error": "\(nicProblem)"]) }
        }
        do {
            try store.setPhase(name, .running, session: session)
            store.clearHandover(name)
        } catch {
            // The VM runs; the `committed` record stays, and the reconciler, which runs
            // what it says, brings the VM's record up to date.
            logger.warning("the VM runs, but its record could not be updated", metadata: ["vm": "\(name)", "error": "\(error)"])
        }
        var reply = CommittedMessage(
            ferryCPUSeconds: ProcessStats.ownCPUSeconds() - ferryCPUStart,
            qemuCPUSeconds: ProcessStats.cpuSeconds(pid: qemuPID) ?? 0,
            receivedByteCount: dataPath.receivedByteCount,
            ferryPeakRSSBytes: ProcessStats.peakRSSBytes(pid: getpid()) ?? 0, times: times, waits: dataPath.waits,
            networkProblem: nicProblem)
        reply.times?.committedSent = Date().timeIntervalSince1970
        try? link?.send(.committed, reply)
        logger.info("VM runs here now", metadata: ["vm": "\(name)", "from": "\(sourceHost)", "postcopy": "\(postcopy)"])
        if postcopy { return }
        // Out before the session ends and closes the link (a moving one is not waited for).
        link?.drain(timeout: .seconds(1))
        qmp.close()
    }

    /// Postcopy, after the commit: the VM runs here and faults in what it lacks from the
    /// source QEMU, over the streams, until QEMU has every page. The session (its data path,
    /// QEMU's sockets) lives until then; `postcopyDone` tells the source, with what the guest
    /// waited for pages.
    func finishPostcopy(dataPath: DestinationDataPath, qmp: QMPClient, name: String) throws(IncomingError) {
        inPostcopy.withLock { $0 = true }
        defer { inPostcopy.withLock { $0 = false } }
        // The source waits for a NIC however long every one is down; so does this side:
        // the control link, and the sender of the return path (which would otherwise fail
        // with its last channel).
        link?.waitForever()
        dataPath.reverse?.scheduler.waitForChannelsForever()
        var qemuCompleted = false
        var lastCheck = Stopwatch()
        while !(qemuCompleted && dataPath.isComplete) {
            switch events.next(timeout: .milliseconds(100)) {
            case .frame(let frame)?:
                switch frame.type {
                case .streamEnd:
                    let end = try peer { try ControlCoding.decode(StreamEndMessage.self, from: frame) }
                    do { try dataPath.streamEnded(end) } catch {
                        throw .dataPath((error as? TransportError) ?? .protocolViolation("\(error)"))
                    }
                case .status, .abort:
                    break  // past the commit nothing is aborted: the VM runs here
                default:
                    break
                }
            case .controlLost(let why)?:
                throw .sourceGone("lost the source during postcopy (\(why)); the VM runs here and waits for its missing pages")
            case .dataFailed(let error)?:
                throw .dataPath(error)
            case .qemuStatus(let status, _)?:
                if status == .completed { qemuCompleted = true }
                if status == .failed { throw .qemu("the destination QEMU's postcopy failed: \(reason(qmp))") }
            case .reverseEnded(let end)?:
                try? link?.send(.streamEnd, end)
            case .streamsComplete?, nil:
                break
            }
            if lastCheck.elapsed >= 0.5 {
                lastCheck = Stopwatch()
                if !ProcessStats.isAlive(pid: qemuPID) { throw .qemu("the destination QEMU exited during postcopy") }
                // Briefly: QEMU's main thread may be blocked on a missing page (a lost source),
                // and this loop must stay free to notice that it is superseded.
                if !qemuCompleted, let info = try? qmp.queryMigrate(timeout: .seconds(1)) { qemuCompleted = info.status == .completed }
            }
        }
        let info = try? qmp.queryMigrate()
        let faults = faultClock?.summary()
        let done = PostcopyDoneMessage(blocktimeMilliseconds: info?.postcopyBlocktimeMilliseconds, requests: faults?.requests ?? 0,
                                       latencyP50Milliseconds: faults?.p50, latencyP99Milliseconds: faults?.p99,
                                       latencyMaxMilliseconds: faults?.max)
        try? link?.send(.postcopyDone, done)
        link?.drain(timeout: .seconds(1))
        logger.info("postcopy complete: every page is here", metadata: ["vm": "\(name)"])
        qmp.close()
    }

    /// Writes this session's handover record durably (see ``HandoverRecord``).
    /// Durable before the step that depends on it; the staged copy, if one was written
    /// ahead (``stage(_:for:)``), only needs its rename and the directory's fsync.
    private func record(_ decision: HandoverRecord.Decision, for name: String) throws(IncomingError) {
        do {
            try store.recordHandover(name, HandoverRecord(session: session, role: .destination, decision: decision,
                                                          peerHost: sourceDaemon.host, peerPort: sourceDaemon.port),
                                     staged: staged.removeValue(forKey: decision))
        } catch {
            throw .record("cannot record the switchover (\(decision.rawValue)) here: \(error)")
        }
    }

    /// Writes a record the switchover will need next, ahead of the step that puts it in
    /// place: its file write and fsync leave the guest's pause. Best effort.
    func stage(_ decision: HandoverRecord.Decision, for name: String) {
        guard staged[decision] == nil else { return }
        staged[decision] = try? store.stageHandover(name, HandoverRecord(session: session, role: .destination, decision: decision,
                                                                         peerHost: sourceDaemon.host, peerPort: sourceDaemon.port))
    }

    func validate(_ offer: OfferMessage) throws(IncomingError) {
        let spec = offer.spec
        if let problem = VMSpec.validateName(spec.name) { throw .refused(.badOffer, problem) }
        // Whatever its files say (they may be damaged): a QEMU of that name runs here.
        if (try? store.record(spec.name))?.alive == true || !store.qemus(of: spec.name).isEmpty {
            throw .refused(.vmExists, "a VM named '\(spec.name)' already runs on \(HostInfo.hostname)")
        }
        guard spec.memoryMiB >= 16 && spec.memoryMiB <= 16 << 20 else {
            throw .refused(.badOffer, "memory of \(spec.memoryMiB) MiB is out of range")
        }
        guard spec.cpus >= 1 && spec.cpus <= 1024 else { throw .refused(.badOffer, "\(spec.cpus) vCPUs is out of range") }
        if let problem = spec.bootProblem { throw .refused(.badOffer, "the VM \(problem)") }
        guard offer.streams.multifdChannels >= 0 && offer.streams.multifdChannels <= 64 else {
            throw .refused(.badOffer, "\(offer.streams.multifdChannels) multifd channels is out of range (0-64)")
        }
        if spec.accelerator == .kvm && !HostInfo.hasHardwareVirtualization {
            throw .refused(.badOffer, "the VM runs under KVM and \(HostInfo.hostname) cannot run KVM guests")
        }
        for file in spec.bootFiles {
            guard file.sha256.count == 64, Hex.decode(file.sha256) != nil, file.byteCount >= 0, file.byteCount < 4 << 30 else {
                throw .refused(.badOffer, "boot file \(file.name) has a malformed hash or size")
            }
        }
        if !spec.nics.isEmpty {
            guard version >= ProtocolVersion.guestNICs else {
                throw .refused(.badOffer, "a VM with NICs needs protocol v\(ProtocolVersion.guestNICs); this session speaks v\(version)")
            }
            // Its network must be here (the same bridge), its MACs free, its models known.
            if let problem = GuestNICs.problem(spec.nics, vm: spec.name, store: store) { throw .refused(.badOffer, problem) }
        }
        if offer.streams.isPostcopy {
            guard version >= ProtocolVersion.postcopy else {
                throw .refused(.badOffer, "postcopy needs protocol v\(ProtocolVersion.postcopy); this session speaks v\(version)")
            }
            if let problem = HostInfo.postcopyProblem {
                throw .refused(.badOffer, "\(HostInfo.hostname) cannot take a postcopy migration: \(problem)")
            }
        }
        if let drain = DrainMarker.current(runDirectory: store.paths.runDirectory) {
            throw .refused(.busy, "\(HostInfo.hostname) is being drained (ferry drain pid \(drain.pid)) and takes no VMs until it ends")
        }
        if let limit = server.options.maxGuestMemoryBytes {
            let used = server.guestMemoryBytes(excluding: spec.name)
            let wanted = UInt64(spec.memoryMiB) << 20
            if used + wanted > limit {
                throw .refused(.badOffer, "\(HostInfo.hostname) has \(used >> 20) MiB of guest memory of its --max-guest-memory \(limit >> 20) MiB: no room for \(spec.name)'s \(spec.memoryMiB) MiB")
            }
        }
        // Room for its RAM here, or its QEMU would die once the guest filled the directory.
        do { try store.checkMemoryRoom(for: spec) } catch {
            throw .refused(.badOffer, "\(HostInfo.hostname): \(error)")
        }
    }

    /// Before the commit, the destination copy is disposable: stop it and forget it.
    func discardDestinationCopy() {
        dataPath?.stop()
        for record in staged.values { record.discard() }
        staged = [:]
        guard let spec else { return }
        // Only this session's own record: a refused offer must not touch another's.
        if (try? store.readHandover(spec.name))?.session == session { store.clearHandover(spec.name) }
        if qemuPID > 0 {
            QEMU.stop(pid: qemuPID, qmp: qmp)
            store.archiveAndRemove(spec.name, reason: "incoming-aborted")
        }
        removeCreatedDisks()
    }

    // MARK: Waiting in line (`--max-migrations`)

    /// Step: a place among the host's running migrations. Meanwhile the source hears its
    /// position every second in a `status` frame (which also keeps its wait for `ready`
    /// from timing out), and an `abort` or a lost connection ends the wait: the session
    /// leaves the line and nothing else was started.
    func waitForTurn(vm: String) throws(IncomingError) {
        try move(to: .queued)
        let admission = server.admission
        admission.enqueue(session: session, vm: vm, source: sourceHost)
        let arrived = Stopwatch()
        var told = false
        let link = try controlLinkOrFail
        while let place = admission.wait(session: session, timeout: told ? .seconds(1) : .milliseconds(1)) {
            let (position, length) = place
            if !told { logger.info("incoming migration waits in line", metadata: ["vm": "\(vm)", "position": "\(position)", "of": "\(length)"]) }
            told = true
            try peer {
                try link.send(.status, StatusMessage(
                    text: "queued at \(HostInfo.hostname) (position \(position) of \(length), \(admission.limit) running at most)",
                    queuePosition: position, queueLength: length, queuedSeconds: arrived.elapsed))
            }
            guard let frame = try peer({ try link.receiveChecked(timeout: .zero) }) else { continue }
            switch frame.type {
            case .abort:
                let reason = (try? ControlCoding.decode(AbortMessage.self, from: frame))?.reason ?? "no reason"
                try move(to: .aborted)
                throw .sourceGone("the source gave up while queued: \(reason)")
            case .status:
                continue
            default:
                throw .protocolViolation("unexpected \(frame.type) frame while queued")
            }
        }
        // The report's peak RSS is this session's: the daemon's high-water mark starts
        // again here when no other migration runs beside this one (with others running,
        // it covers them too).
        if admission.runningCount == 1 { ProcessStats.resetPeakRSS() }
        if told {
            try peer {
                try link.send(.status, StatusMessage(text: "admitted after \(String(format: "%.1f", arrived.elapsed)) s in line",
                                                       queuePosition: 0, queueLength: 0, queuedSeconds: arrived.elapsed))
            }
            logger.info("incoming migration admitted", metadata: ["vm": "\(vm)", "queuedSeconds": "\(String(format: "%.1f", arrived.elapsed))"])
        }
    }
}
