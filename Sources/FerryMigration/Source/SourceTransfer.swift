import FerryQMP
import FerryTransport
import FerryWire
import Foundation

/// Where the transfer stands: what has to be true before the switchover may be decided.
struct TransferState {
    let streamCount: Int
    /// The destination said `loaded`: its QEMU holds the whole VM, paused.
    var loaded = false
    /// QEMU on this side has sent everything.
    var qemuDone = false
    var streamEnds: [UInt32: StreamEndMessage] = [:]
    /// Seconds since the start of the last `query-migrate`.
    var lastPoll = -1.0
    /// When QEMU's MIGRATION event said it completed (seconds since the start).
    var completedEventAt: Double?

    var isComplete: Bool { qemuDone && loaded && streamEnds.count == streamCount }
}

extension SourceMigration {
    /// How often QEMU is asked for its progress while it sends (its MIGRATION event says
    /// when it completes, at once), and while the destination loads what QEMU has sent.
    static let progressPollInterval = 0.25
    static let finishingPollInterval = 0.1

    /// Step: watches QEMU, the destination and the data path until QEMU has sent
    /// everything, every stream has ended and the destination has loaded the VM.
    func transfer(_ transport: SourceTransport, plan: StreamPlan, link: ControlLink, qmp: QMPClient) throws(MigrateError) {
        var state = TransferState(streamCount: plan.streamCount)
        var sampler = RateSampler()
        while !state.isComplete {
            if let event = events.next(timeout: .milliseconds(100)) {
                try handle(event, &state, transport: transport, control: link)
            }
            takeLinkNotes()
            let interval = state.qemuDone ? Self.finishingPollInterval : Self.progressPollInterval
            if track.elapsed - state.lastPoll >= interval {
                state.lastPoll = track.elapsed
                try poll(qmp, &state, &sampler, dataPath: transport.dataPath)
            }
        }
        do {
            try transport.scheduler.waitUntilAllAcknowledged(timeout: .seconds(10))
        } catch {
            throw .dataPath(.timedOut("\(error)"))
        }
        transport.dataPath.markFinished()
    }

    private func handle(_ event: Event, _ state: inout TransferState, transport: SourceTransport,
                        control: ControlLink) throws(MigrateError) {
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
        case .qemuStopped(let at):
            guard qemu?.migrateStarted == true else { return }
            track.journal.stopEventAt = at
            try move(to: .switchover)
            track.note("source VM paused for the switchover")
        case .qemuStatus(let status):
            // QEMU's account (figures, a failure's reason) comes from a poll, at once.
            if status.hasEnded || status == .cancelling { state.lastPoll = -1 }
            if status == .completed && state.completedEventAt == nil { state.completedEventAt = track.elapsed }
        case .streamAccepted(let id):
            do {
                try control.send(.streamOpen, StreamOpenMessage(stream: id))
            } catch {
                throw .controlLost("\(error)")
            }
        }
    }

    private func handle(_ frame: Frame, _ state: inout TransferState, scheduler: SendScheduler) throws(MigrateError) {
        switch frame.type {
        case .loaded:
            state.loaded = true
            track.note("destination loaded the VM")
        case .error:
            let message = (try? ControlCoding.decode(ErrorMessage.self, from: frame))
                ?? ErrorMessage(code: .invalid, message: "unreadable error")
            throw .destinationFailed(message)
        case .status:
            break
        case .limit:
            guard let limit = try? ControlCoding.decode(LimitMessage.self, from: frame) else { return }
            let effective = [options.bandwidthBytesPerSecond, limit.bytesPerSecond].compactMap { $0 }.min()
            scheduler.setRateLimit(bytesPerSecond: effective)
            track.note("destination limits this migration to " + (limit.bytesPerSecond.map { Format.rate(Double($0) * 8) } ?? "nothing"))
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
            track.note("channel \(ch) on \(nic) failed (\(reason)); \(requeued) chunk(s) sent again on the others")
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

    /// QEMU's account of its migration: progress for the display and the timeline, and its
    /// end if the MIGRATION event has not told it yet.
    private func poll(_ qmp: QMPClient, _ state: inout TransferState, _ sampler: inout RateSampler,
                      dataPath: SourceDataPath) throws(MigrateError) {
        let info: MigrationInfo
        do {
            info = try qmp.queryMigrate()
        } catch {
            throw .qemu(.lost(error))
        }
        track.journal.lastInfo = info
        try checkQEMU(info.status, reason: info.errorDescription)
        if info.status == .completed && !state.qemuDone {
            state.qemuDone = true
            track.journal.completedAt = state.completedEventAt ?? track.elapsed
            track.note("source QEMU finished sending (\(Format.bytes(info.transferredBytes)) of RAM)")
        }
        let bytes = dataPath.streamByteCount
        let stats = dataPath.channelStats
        track.journal.timeline.append(sampler.sample(now: track.elapsed, streamBytes: bytes, channels: stats))
        track.show(streamBytes: bytes, bitsPerSecond: sampler.bitsPerSecond, channels: stats,
                 interfaceBitsPerSecond: sampler.interfaceBitsPerSecond)
    }

    private func checkQEMU(_ status: MigrationStatus, reason: String?) throws(MigrateError) {
        do {
            try QEMUFailure.check(status, reason: reason)
        } catch {
            throw .qemu(error)
        }
    }
}
