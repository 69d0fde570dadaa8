import FerryQMP
import FerryTransport
import FerryWire
import Foundation

/// Where the transfer stands: what has to be true before the switchover may be decided.
struct TransferState {
    /// Forward halves to end: QEMU's streams and the disk copies' NBD connections.
    let streamCount: Int
    /// Reverse halves to end: the disk copies' (their NBD servers close after the client).
    var reverseCount = 0
    var reverseEnds = Set<UInt32>()
    /// The destination said `loaded`: its QEMU holds the whole VM, paused.
    var loaded = false
    /// QEMU on this side has sent everything.
    var qemuDone = false
    var streamEnds: [UInt32: StreamEndMessage] = [:]
    /// Seconds since the start of the last `query-migrate`.
    var lastPoll = -1.0
    /// When QEMU's MIGRATION event said it completed (seconds since the start).
    var completedEventAt: Double?
    /// The best rate the channels have carried QEMU's streams at (bytes per second), over
    /// whole seconds, leaving out the first (when QEMU fills the window at once).
    var peakRate = 0.0
    var rateMark: (at: Double, bytes: UInt64, first: Bool)?
    /// The window and QEMU's downtime limit as last set (``SwitchoverBudget``).
    var budget: SwitchoverBudget?
    /// The window has been shrunk and QEMU is held until Ferry's buffers are down to it.
    var draining = false
    /// The NIC pairs' speeds together, bytes per second (0: some unknown).
    var linkRate = 0.0
    /// The window the transfer started with.
    var fullWindow = ChunkPolicy.windowByteCount

    /// The window was shrunk for the first pass's tail (``SwitchoverBudget/tailWindow``).
    var tailWindow = false

    /// Ferry asked QEMU to switch to postcopy: the transfer ends once the destination holds
    /// the device state (``SourceMigration/finishPostcopy`` waits for the rest).
    var postcopy = false

    var isComplete: Bool {
        if postcopy { return loaded }
        return qemuDone && loaded && streamEnds.count == streamCount && reverseEnds.count == reverseCount
    }

    /// The rate to plan with: the channels' best over whole seconds; else the NICs' speeds;
    /// else `average` (the average so far); nil if none is known.
    func bestRate(average: Double) -> Double? {
        let rate = peakRate > 0 ? peakRate : linkRate > 0 ? linkRate : average
        return rate > 0 ? rate : nil
    }
}

extension SourceMigration {
    /// How often QEMU is asked for its progress while it sends (its MIGRATION event says
    /// when it completes, at once), and while the destination loads what QEMU has sent.
    static let progressPollInterval = 0.25
    static let finishingPollInterval = 0.1

    /// Step: watches QEMU, the destination and the data path until QEMU has sent
    /// everything, every stream has ended and the destination has loaded the VM.
    func transfer(_ transport: SourceTransport, plan: StreamPlan, link: ControlLink, qmp: QMPClient) throws(MigrateError) {
        var state = TransferState(streamCount: plan.streamCount + diskCopies.count)
        state.reverseCount = diskCopies.count
        state.linkRate = Double(transport.linkBitsPerSecond ?? 0) / 8
        state.fullWindow = transport.scheduler.window
        var sampler = RateSampler()
        while !state.isComplete {
            if let event = events.next(timeout: .milliseconds(100)) {
                try handle(event, &state, transport: transport, control: link, qmp: qmp)
            }
            takeLinkNotes()
            let interval = state.qemuDone || state.draining ? Self.finishingPollInterval : Self.progressPollInterval
            if track.elapsed - state.lastPoll >= interval {
                state.lastPoll = track.elapsed
                try poll(qmp, &state, &sampler, dataPath: transport.dataPath)
            }
        }
        if state.postcopy { return }
        do {
            try transport.scheduler.waitUntilAllAcknowledged(timeout: .seconds(10))
        } catch {
            throw .dataPath(.timedOut("\(error)"))
        }
        transport.dataPath.markFinished()
    }

    /// Step (postcopy, after the commit): the VM runs at the destination and faults in what
    /// it lacks; QEMU here sends the rest, the pages asked for first. Done when QEMU here has
    /// completed, its streams have ended and are acknowledged, and the destination says its
    /// QEMU has every page. Nothing stops it now: the source copy is stale, and the
    /// destination's needs this one's pages.
    func finishPostcopy(_ transport: SourceTransport, link: ControlLink, qmp: QMPClient) throws(MigrateError) {
        try move(to: .postcopy)
        // Giving up now would leave both QEMUs paused with the VM split between them: with
        // every NIC down the channels and the control connection wait for one to come back,
        // however long (the destination's session waits as long), and carry on from there.
        transport.scheduler.waitForChannelsForever()
        link.waitForever()
        let streamCount = session?.plan.streamCount ?? 2
        var qemuDone = false
        var ends = Set<UInt32>()
        var done: PostcopyDoneMessage?
        var sampler = RateSampler()
        var lastPoll = -1.0
        while !(qemuDone && ends.count == streamCount && done != nil) {
            if let event = events.next(timeout: .milliseconds(100)) {
                switch event {
                case .frame(let frame):
                    switch frame.type {
                    case .postcopyDone:
                        done = (try? ControlCoding.decode(PostcopyDoneMessage.self, from: frame))
                            ?? PostcopyDoneMessage(blocktimeMilliseconds: nil, requests: 0, latencyP50Milliseconds: nil,
                                                   latencyP99Milliseconds: nil, latencyMaxMilliseconds: nil)
                    case .streamEnd:
                        // A reverse half (the destination QEMU closed its end).
                        if let end = try? ControlCoding.decode(StreamEndMessage.self, from: frame) {
                            try? transport.dataPath.reverse?.streamEnded(end)
                        }
                    case .error:
                        throw destinationFailure(frame)
                    case .limit:
                        applyLimit(frame, scheduler: transport.scheduler)
                    default:
                        break
                    }
                case .controlLost(let why):
                    throw .controlLost(why)
                case .dataPath(.streamEnded(let end)):
                    ends.insert(end.stream)
                    do {
                        try link.send(.streamEnd, end)
                    } catch {
                        throw .controlLost("\(error)")
                    }
                    if ends.count == streamCount { transport.scheduler.closeInput() }
                case .dataPath(.failed(let failure)):
                    throw .dataPath(failure)
                case .dataPath(.channelFailed(let ch, let nic, let reason, let requeued)):
                    noteChannelFailed(ch, nic, reason, requeued)
                case .dataPath(.compression(let codec, let reason)):
                    track.note("compression: \(codec ?? "none") (\(reason))")
                case .qemuStatus(let status, _):
                    if status == .completed { qemuDone = true }
                case .note(let text):
                    track.note(text)
                case .dataPath(.channelUp), .streamAccepted, .qemuStopped, .interrupted, .libvirtFinished:
                    break
                }
            }
            takeLinkNotes()
            if track.elapsed - lastPoll >= Self.progressPollInterval {
                lastPoll = track.elapsed
                let info = try qemuAccount(qmp)
                if info.status == .completed { qemuDone = true }
                let bytes = transport.dataPath.streamByteCount
                let stats = transport.dataPath.channelStats
                track.journal.timeline.append(sampler.sample(now: track.elapsed, streamBytes: bytes, channels: stats))
                track.show(streamBytes: bytes, bitsPerSecond: sampler.bitsPerSecond, channels: stats,
                           interfaceBitsPerSecond: sampler.interfaceBitsPerSecond)
            }
        }
        do {
            try transport.scheduler.waitUntilAllAcknowledged(timeout: .seconds(10))
        } catch {
            throw .dataPath(.timedOut("\(error)"))
        }
        transport.dataPath.markFinished()
        track.journal.completedAt = track.elapsed
        postcopy?.completedAt = track.elapsed
        if let done {
            postcopy?.blocktimeMilliseconds = done.blocktimeMilliseconds
            postcopy?.requests = done.requests
            postcopy?.latencyP50Milliseconds = done.latencyP50Milliseconds
            postcopy?.latencyP99Milliseconds = done.latencyP99Milliseconds
            postcopy?.latencyMaxMilliseconds = done.latencyMaxMilliseconds
        }
        track.note("postcopy complete: the destination has every page")
    }

    /// Switches QEMU to postcopy when the migration should (`--converge postcopy` once the
    /// first pass is done and the rest would not fit the pause; `auto` when the throttle
    /// cannot finish in time, ``ConvergencePolicy/shouldSwitchToPostcopy``; the operator's
    /// `--postcopy-now`). From here no stop is granted: the guest is about to run at the
    /// destination.
    private func considerPostcopy(_ info: MigrationInfo, _ state: inout TransferState, rate: Double?, qmp: QMPClient) throws(MigrateError) {
        guard session?.plan.isPostcopy == true, postcopy == nil, info.status == .active, track.journal.stopEventAt == nil else { return }
        if info.dirtySyncCount >= 2 && firstPassEndedAt == nil { firstPassEndedAt = track.elapsed }
        var reason: String?
        if postcopyRequested.withLock({ $0 }) {
            reason = "asked by the operator"
        } else if info.dirtySyncCount >= 2, let rate {
            let pauseSeconds = options.downtimeLimit.seconds
            switch options.converge {
            case .postcopy where Double(info.remainingBytes) / rate > pauseSeconds:
                reason = "--converge postcopy, once QEMU's first pass was done"
            case .auto:
                guard let latest = throttleWatch.measurements.last else { break }
                let policy = ConvergencePolicy(ceiling: options.maxThrottlePercent)
                let needed = policy.needed(dirtyBytesPerSecond: latest.dirtyBytesPerSecond, carriedBytesPerSecond: rate,
                                           current: latest.throttlePercent)
                let firstPassEnd = firstPassEndedAt ?? track.elapsed
                let firstPass = firstPassEnd - (track.journal.migrateIssuedAt ?? 0)
                let since = track.elapsed - firstPassEnd
                // `current`: the throttle the latest measured pass ran at, so that the
                // ceiling counts as not enough only once a pass has run under it.
                if policy.shouldSwitchToPostcopy(secondsSinceFirstPass: since, firstPassSeconds: firstPass,
                                                 current: latest.throttlePercent, needed: needed) {
                    reason = latest.throttlePercent >= policy.ceiling
                        ? "the throttle is at its ceiling and the guest still dirties too fast"
                        : String(format: "the throttle had not finished %.0f s after QEMU's first pass, which took %.0f s", since, firstPass)
                }
            default:
                break
            }
        }
        guard let reason else { return }
        try interrupt.passCommitPoint()
        do {
            try qmp.execute("migrate-start-postcopy")
        } catch {
            throw .qemu(.command(doing: "switch to postcopy", error))
        }
        postcopy = PostcopyAccount(requestedAt: track.elapsed, reason: reason, remainingBytes: info.remainingBytes)
        state.postcopy = true
        track.note("switching to postcopy (\(reason)) with \(Format.bytes(info.remainingBytes)) left to send; from now on the migration is not stopped")
    }

    private func handle(_ event: Event, _ state: inout TransferState, transport: SourceTransport,
                        control: ControlLink, qmp: QMPClient) throws(MigrateError) {
        switch event {
        case .frame(let frame):
            try handle(frame, &state, scheduler: transport.scheduler)
        case .controlLost(let why):
            throw .controlLost(why)
        case .dataPath(let e):
            try handle(e, &state, scheduler: transport.scheduler, control: control)
        case .note(let text):
            track.note(text)
        case .interrupted:
            try interrupt.check()
        case .libvirtFinished:
            break  // only a libvirt migration posts it
        case .qemuStopped(let at):
            guard qemu?.migrateStarted == true else { return }
            track.journal.stopEventAt = at
            track.journal.switchover.stop = at
            try move(to: .switchover)
            stageCommit()
            track.note("source VM paused for the switchover")
        case .qemuStatus(let status, let at):
            // QEMU's account (figures, a failure's reason) comes from a poll, at once.
            if status.hasEnded || status == .cancelling { state.lastPoll = -1 }
            // Paused before the device state (only with disks copied): the copies finish first.
            if status == .preSwitchover && !diskCopies.isEmpty && !diskCopiesFinished { try finishDiskCopies(qmp) }
            if status == .completed && state.completedEventAt == nil {
                state.completedEventAt = track.elapsed
                track.journal.switchover.completed = at
            }
        case .streamAccepted(let id):
            do {
                try control.send(.streamOpen, StreamOpenMessage(stream: id))
            } catch {
                throw .controlLost("\(error)")
            }
        }
    }

    /// The destination's `streamEnd` of a reverse half: every chunk of it is written here,
    /// then that direction of the local socket closes. Returns the half.
    func endReverseHalf(_ frame: Frame) throws(MigrateError) -> UInt32 {
        guard let reverse = transport?.dataPath.reverse else {
            throw .protocolViolation("the destination ended a stream's reverse half on a one-way session")
        }
        do {
            let end = try ControlCoding.decode(StreamEndMessage.self, from: frame)
            guard StreamID.isReverse(end.stream) else { throw TransportError.protocolViolation("the destination ended forward half \(end.stream)") }
            try reverse.streamEnded(end)
            return end.stream
        } catch {
            throw .protocolViolation("the destination's streamEnd: \(error)")
        }
    }

    /// The destination's `error` frame, as the failure it ends the migration with.
    func destinationFailure(_ frame: Frame) -> MigrateError {
        .destinationFailed((try? ControlCoding.decode(ErrorMessage.self, from: frame)) ?? ErrorMessage(code: .invalid, message: "unreadable error"))
    }

    func noteChannelFailed(_ channel: Int, _ nic: String, _ reason: String, _ requeued: Int) {
        track.note(MigrationReport.channelFailedEvent(channel: channel, interface: nic, reason: reason, requeuedChunks: requeued))
    }

    /// The destination's `limit`: the smaller of it and `--bandwidth` from now on.
    func applyLimit(_ frame: Frame, scheduler: SendScheduler) {
        guard let limit = try? ControlCoding.decode(LimitMessage.self, from: frame) else { return }
        let effective = [options.bandwidthBytesPerSecond, limit.bytesPerSecond].compactMap { $0 }.min()
        scheduler.setRateLimit(bytesPerSecond: effective)
        track.note("destination limits this migration to " + (limit.bytesPerSecond.map { Format.rate(Double($0) * 8) } ?? "nothing"))
    }

    private func handle(_ frame: Frame, _ state: inout TransferState, scheduler: SendScheduler) throws(MigrateError) {
        switch frame.type {
        case .loaded:
            state.loaded = true
            track.journal.switchover.loadedReceived = Date().timeIntervalSince1970
            track.note(state.postcopy ? "destination loaded the device state; the memory follows in postcopy once it runs" : "destination loaded the VM")
        case .error:
            throw destinationFailure(frame)
        case .status:
            break
        case .limit:
            applyLimit(frame, scheduler: scheduler)
        case .streamEnd:
            // A reverse half (a disk copy's NBD server closed its side) has ended.
            state.reverseEnds.insert(try endReverseHalf(frame))
        default:
            throw .protocolViolation("destination sent an unexpected \(frame.type) frame")
        }
    }

    private func handle(_ event: DataPathEvent, _ state: inout TransferState, scheduler: SendScheduler,
                        control: ControlLink) throws(MigrateError) {
        switch event {
        case .channelUp:
            break
        case .channelFailed(let ch, let nic, let reason, let requeued):
            noteChannelFailed(ch, nic, reason, requeued)
        case .streamEnded(let end):
            state.streamEnds[end.stream] = end
            do {
                try control.send(.streamEnd, end)
            } catch {
                throw .controlLost("\(error)")
            }
            if state.streamEnds.count == state.streamCount { scheduler.closeInput() }
        case .failed(let failure):
            throw .dataPath(failure)
        case .compression(let codec, let reason):
            track.note("compression: \(codec ?? "none") (\(reason))")
        }
    }

    /// QEMU's `query-migrate`, kept in the journal; a failed or cancelled migration throws.
    func qemuAccount(_ qmp: QMPClient) throws(MigrateError) -> MigrationInfo {
        let info: MigrationInfo
        do {
            info = try qmp.queryMigrate()
        } catch {
            throw .qemu(.lost(error))
        }
        track.journal.lastInfo = info
        try checkQEMU(info.status, reason: info.errorDescription)
        return info
    }

    /// QEMU's account of its migration: progress for the display and the timeline, and its
    /// end if the MIGRATION event has not told it yet.
    private func poll(_ qmp: QMPClient, _ state: inout TransferState, _ sampler: inout RateSampler,
                      dataPath: SourceDataPath) throws(MigrateError) {
        let info = try qemuAccount(qmp)
        if !diskCopies.isEmpty && !diskCopiesFinished {
            // A mirror that fails after it caught up (the source image cannot be read, its
            // NBD connection broke) ends the migration now, not at the switchover.
            try checkDiskCopies()
            steerDiskCopies(Self.diskJobs(qmp), dataPath: dataPath, qmp: qmp)
            // QEMU's MIGRATION event for the pause before the device state, missed or late.
            if info.status == .preSwitchover { try finishDiskCopies(qmp) }
        }
        if info.status == .completed && !state.qemuDone {
            state.qemuDone = true
            track.journal.completedAt = state.completedEventAt ?? track.elapsed
            track.note("source QEMU finished sending (\(Format.bytes(info.transferredBytes)) of RAM)")
        }
        let bytes = dataPath.streamByteCount
        let stats = dataPath.channelStats
        track.journal.timeline.append(sampler.sample(now: track.elapsed, streamBytes: bytes, channels: stats))
        if let mark = state.rateMark {
            if track.elapsed - mark.at >= 1 {
                if !mark.first { state.peakRate = max(state.peakRate, Double(bytes &- mark.bytes) / (track.elapsed - mark.at)) }
                state.rateMark = (track.elapsed, bytes, false)
            }
        } else {
            state.rateMark = (track.elapsed, bytes, true)
        }
        // The first pass's tail: if it is also the last (a guest that dirties little), QEMU
        // stops with nothing left, and whatever Ferry's window holds then is in the pause.
        if info.status == .active && info.dirtySyncCount < 2 && track.journal.stopEventAt == nil && state.budget == nil
            && !state.tailWindow, let rate = state.bestRate(average: 0),
            let window = SwitchoverBudget.tailWindow(remainingBytes: info.remainingBytes, totalBytes: info.totalBytes,
                                                     rateBytesPerSecond: rate, fullWindow: state.fullWindow) {
            state.tailWindow = true
            dataPath.scheduler.setWindow(byteCount: window)
            track.note("QEMU's first pass is nearly done (\(Format.bytes(info.remainingBytes)) left): window shrunk to \(Format.bytes(UInt64(window)))")
        }
        // Before QEMU's STOP (after it, the final pass has begun): the switchover budget once
        // its first pass is done, and the throttle.
        if info.status == .active && track.journal.stopEventAt == nil {
            let average = track.journal.migrateIssuedAt.map { Double(bytes) / max(0.001, track.elapsed - $0) } ?? 0
            if info.dirtySyncCount >= 2 {
                try budgetSwitchover(&state, qmp: qmp, scheduler: dataPath.scheduler, sync: info.dirtySyncCount, average: average)
            }
            try steerConvergence(info, rate: state.bestRate(average: average), qmp: qmp)
            try considerPostcopy(info, &state, rate: state.bestRate(average: average), qmp: qmp)
        }
        track.show(streamBytes: bytes, bitsPerSecond: sampler.bitsPerSecond, channels: stats,
                 interfaceBitsPerSecond: sampler.interfaceBitsPerSecond)
    }

    /// `--converge`: the throttle the guest needs at the rates measured now, set in QEMU's
    /// auto-converge parameters (``ConvergencePolicy``), and the throttle QEMU applies, in
    /// the journal. From QEMU's second pass on: its dirty rate is measured once per pass.
    private func steerConvergence(_ info: MigrationInfo, rate: Double?, qmp: QMPClient) throws(MigrateError) {
        guard var account = track.journal.convergence else { return }
        defer { track.journal.convergence = account }
        let dirty = info.dirtyBytesPerSecond
        account.peakDirtyBytesPerSecond = max(account.peakDirtyBytesPerSecond, dirty)
        let current = info.cpuThrottlePercentage
        if current != (account.points.last?.throttlePercent ?? 0) {
            account.points.append(.init(at: track.elapsed, throttlePercent: current, dirtyBytesPerSecond: dirty))
            track.note(current > 0 ? "QEMU throttles the guest's vCPUs to \(current)% (it dirtied \(Format.bytes(dirty))/s)" : "vCPU throttle lifted")
        }
        // QEMU measures the dirty rate at each sync, over the pass before it, under the
        // throttle that pass ran at: the one seen before this sync (a sync may raise it).
        if info.dirtySyncCount > throttleWatch.sync && info.dirtySyncCount >= 2 {
            throttleWatch.measurements.append(.init(throttlePercent: throttleWatch.throttle, dirtyBytesPerSecond: Double(dirty)))
        }
        throttleWatch.sync = max(throttleWatch.sync, info.dirtySyncCount)
        throttleWatch.throttle = current
        guard let latest = throttleWatch.measurements.last, let rate, latest.dirtyBytesPerSecond > 0 else { return }
        let policy = ConvergencePolicy(ceiling: account.ceilingPercent)
        let before = throttleWatch.measurements.last { $0.throttlePercent < latest.throttlePercent }
        let needed = policy.needed(dirtyBytesPerSecond: latest.dirtyBytesPerSecond, carriedBytesPerSecond: rate,
                                   current: latest.throttlePercent, before: before)
        let (initial, increment) = policy.parameters(needed: needed, current: current)
        var params: [String: JSONValue] = [:]
        if let initial, initial != steeredThrottle.initial { params["cpu-throttle-initial"] = .number(Double(initial)) }
        if let increment, increment != steeredThrottle.increment { params["cpu-throttle-increment"] = .number(Double(increment)) }
        guard !params.isEmpty else { return }
        do {
            try qmp.setMigrationParameters(params)
        } catch {
            throw .qemu(.command(doing: "set QEMU's vCPU throttle", error))
        }
        steeredThrottle = (initial ?? steeredThrottle.initial, increment ?? steeredThrottle.increment)
        track.note(String(format: "the guest dirties %@/s, the channels carry %@/s: throttle %@ (needs %d%%)",
                          Format.bytes(dirty), Format.bytes(UInt64(rate)),
                          initial.map { "starts at \($0)%" } ?? "steps by \(increment ?? 0)%", needed))
    }

    /// After QEMU's first pass: the late window and QEMU's downtime limit
    /// (``SwitchoverBudget``), set again when the rate moves the limit by 10 ms or more.
    private func budgetSwitchover(_ state: inout TransferState, qmp: QMPClient, scheduler: SendScheduler,
                                  sync: UInt64, average: Double) throws(MigrateError) {
        guard let rate = state.bestRate(average: average) else { return }
        let target = Int(options.downtimeLimit.milliseconds)
        let budget = SwitchoverBudget(targetMilliseconds: target, rateBytesPerSecond: rate, fullWindow: state.fullWindow,
                                      qemuBufferedBytes: SwitchoverBudget.qemuBufferedBytes(streamCount: state.streamCount),
                                      share: SwitchoverBudget.share(afterSync: sync))
        if let old = state.budget, abs(old.qemuLimitMilliseconds - budget.qemuLimitMilliseconds) < 10, old.window == budget.window { return }
        scheduler.setWindow(byteCount: budget.window)
        // QEMU stays held until what the first pass left in Ferry's buffers has crossed:
        // until then a stop would pause the guest for all of it.
        guard !budget.holds(outstanding: scheduler.outstanding) else {
            if !state.draining { track.note("window shrunk to \(Format.bytes(UInt64(budget.window))); QEMU held until Ferry's buffers are down to it") }
            state.draining = true
            return
        }
        state.draining = false
        do {
            try qmp.setMigrationParameters(["downtime-limit": .number(Double(budget.qemuLimitMilliseconds))])
        } catch {
            throw .qemu(.command(doing: "set QEMU's downtime limit", error))
        }
        track.note(String(format: "switchover budget: QEMU's downtime limit %d ms (%.0f ms of the %d ms target is left after the window of %@ drains with QEMU's socket, %.0f ms at %@, and the commit)",
                          budget.qemuLimitMilliseconds, budget.budgetMilliseconds, target, Format.bytes(UInt64(budget.window)),
                          budget.drainMilliseconds, Format.rate(rate * 8)))
        state.budget = budget
    }

    private func checkQEMU(_ status: MigrationStatus, reason: String?) throws(MigrateError) {
        do {
            try QEMUFailure.check(status, reason: reason)
        } catch {
            throw .qemu(error)
        }
    }
}
