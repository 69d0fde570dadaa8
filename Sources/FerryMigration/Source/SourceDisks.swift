import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation

/// A disk the migration copies, and the names QEMU and Ferry know its copy by.
struct DiskCopy: Sendable {
    /// Its place in the VM's spec.
    let index: Int
    /// The two-way stream that carries its NBD connection.
    let stream: UInt32
    /// Where the source QEMU's NBD client connects (Ferry listens there).
    let socketPath: String
    /// The mirror job and its target node (the NBD client) in the source QEMU.
    let job: String
    let target: String
    /// What it copies: the allocated part of the image, at most its virtual size.
    let virtualSizeBytes: UInt64

    /// The mirror's dirty-bitmap granularity: 4 KiB, a guest block, so that a guest's small
    /// write dirties (and its copy sends again) only that much, not the 64 KiB QEMU picks for
    /// an NBD target (16 times as much for 4 KiB writes); doubled for disks above 64 GiB so
    /// that QEMU's bitmap stays at most 16 Mi bits (2 MiB) a disk.
    var granularity: UInt64 {
        var g: UInt64 = 4096
        while virtualSizeBytes / g > 1 << 24 && g < 1 << 20 { g *= 2 }
        return g
    }
}

/// QEMU's block jobs as its events tell them: QEMU's reader thread records, the migration's
/// thread waits. Under `monitor`.
final class BlockJobWatch: @unchecked Sendable {
    private let monitor = Monitor()
    private let changed: Monitor.Condition
    private var ready = Set<String>()
    /// Ended jobs, with QEMU's error if they failed.
    private var ended: [String: String?] = [:]

    init() { changed = monitor.makeCondition() }

    /// A QMP event; true if it was a block job's.
    @discardableResult
    func handle(_ event: QMPEvent) -> Bool {
        guard event.name.hasPrefix("BLOCK_JOB_"), let id = event.data["device"]?.string else { return false }
        monitor.withLock {
            switch event.name {
            case "BLOCK_JOB_READY": ready.insert(id)
            case "BLOCK_JOB_COMPLETED": ended[id] = .some(event.data["error"]?.string)
            case "BLOCK_JOB_CANCELLED": ended[id] = .some("cancelled")
            default: break
            }
            changed.broadcast()
        }
        return true
    }

    /// Waits until every job of `ids` is ready or `deadline`; throws the first that ended
    /// (a job ends before it is ready only by failing). `check` runs every 100 ms (a stop,
    /// progress).
    func waitReady(_ ids: [String], deadline: ContinuousClock.Instant, check: () throws(MigrateError) -> Void) throws(MigrateError) {
        while true {
            if let (id, error) = firstEnded(ids) { throw .disks("disk copy \(id) ended before it caught up: \(error ?? "no reason given")") }
            if monitor.withLock({ ids.allSatisfy { ready.contains($0) } }) { return }
            guard ContinuousClock.now < deadline else { throw .disks("the disk copies did not catch up in time") }
            try check()
            _ = monitor.withLock { changed.wait(timeout: .milliseconds(100)) }
        }
    }

    /// Waits until every job of `ids` has ended; throws for one that failed.
    func waitEnded(_ ids: [String], timeout: Duration) throws(MigrateError) {
        guard waitAllEnded(ids, timeout: timeout) else {
            throw .disks("the disk copies did not finish within \(Int(timeout.seconds)) s of the guest's pause")
        }
        let failed = monitor.withLock { ids.lazy.compactMap { id in (self.ended[id] ?? nil).map { (id, $0) } }.first }
        if let (id, error) = failed { throw .disks("disk copy \(id) failed at the switchover: \(error)") }
    }

    /// Waits until every job of `ids` has ended, however; false if one still runs at `timeout`.
    func waitAllEnded(_ ids: [String], timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        monitor.lock()
        defer { monitor.unlock() }
        while !ids.allSatisfy({ ended[$0] != nil }) {
            guard ContinuousClock.now < deadline else { return false }
            _ = changed.wait(timeout: .milliseconds(50))
        }
        return true
    }

    func hasEnded(_ id: String) -> Bool { monitor.withLock { ended[id] != nil } }

    /// Forgets what became of `ids` (jobs of an earlier attempt whose names come again).
    func forget(_ ids: [String]) {
        monitor.withLock { for id in ids { ended[id] = nil; ready.remove(id) } }
    }

    /// The first of `ids` that has ended, with QEMU's error (nil: none has).
    func firstEnded(_ ids: [String]) -> (id: String, error: String?)? {
        monitor.withLock { ids.lazy.compactMap { id in self.ended[id].map { (id, $0) } }.first }
    }
}

extension SourceMigration {
    /// The disks this migration copies (those not shared).
    static func copiedDisks(_ spec: VMSpec, paths: VMPaths) -> [DiskCopy] {
        spec.disks.enumerated().filter { !$0.element.shared }.map { i, disk in
            DiskCopy(index: i, stream: StreamID.firstTwoWay + UInt32(i), socketPath: paths.directory + "/nbd-\(i).sock",
                     job: "ferry-copy-\(i)", target: "disk\(i)-copy", virtualSizeBytes: disk.virtualSizeBytes)
        }
    }

    /// Before the offer: a VM with disks needs a destination of protocol 3 (an older one
    /// would not even see them in the spec), and each shared disk gets a fresh token beside
    /// its image for the destination to find at the same path.
    func prepareDisks(_ spec: VMSpec, version: UInt16) throws(MigrateError) -> [String?]? {
        guard !spec.disks.isEmpty else { return nil }
        guard version >= ProtocolVersion.twoWayStreams else {
            throw .disks("the destination's ferry speaks protocol v\(version); a VM with disks needs v\(ProtocolVersion.twoWayStreams) on both hosts (upgrade ferry there)")
        }
        var tokens: [String?] = []
        for disk in spec.disks {
            guard disk.shared else { tokens.append(nil); continue }
            do {
                tokens.append(try SharedDiskToken.write(for: disk.path, vm: name))
            } catch {
                throw .disks("\(error)")
            }
        }
        return tokens
    }

    /// Step: every disk that is not shared is copied live into the destination's new image,
    /// over a two-way stream each: the source QEMU mirrors it (`blockdev-mirror`) into an
    /// NBD client that connects to Ferry's socket, and the destination connects the stream
    /// to its NBD server. Returns once every copy has caught up; the mirrors then copy what
    /// the guest writes until the switchover (``finishDiskCopies``), and
    /// ``steerDiskCopies`` keeps them converging.
    func copyDisks(_ copies: [DiskCopy], spec: VMSpec, transport: SourceTransport, qmp: QMPClient, link: ControlLink) throws(MigrateError) {
        guard !copies.isEmpty else { return }
        try move(to: .copyingDisks)
        clearLeftoverCopies(qmp, spec: spec)
        diskCopies = copies
        for copy in copies {
            try connectCopy(copy, transport: transport, qmp: qmp, link: link)
            do {
                try qmp.execute("blockdev-mirror", arguments: [
                    "job-id": .string(copy.job), "device": .string(DiskImage.nodeName(copy.index)), "target": .string(copy.target),
                    // Background, not write-blocking (active): QEMU 7.2's active mirror
                    // corrupts its heap and aborts, taking the guest with it, when its target
                    // fails (the link lost, the destination gone, the copy cancelled) while a
                    // guest write is in flight to it. A background mirror's copy lags the
                    // guest's writes, and Ferry makes it converge (``steerDiskCopies``).
                    // Zeros go as NBD write-zeroes requests (no data), which the
                    // destination's image, opened with discard=unmap, keeps sparse.
                    "sync": "full", "copy-mode": "background", "granularity": .number(Double(copy.granularity)),
                ])
            } catch {
                throw .disks("cannot start copying disk \(DiskSpec.guestName(copy.index)): \(error)")
            }
            diskConvergence[copy.index] = DiskConvergence()
        }
        track.note("copying \(copies.count) disk(s): " + copies.map {
            "\(DiskSpec.guestName($0.index)) (\(spec.disks[$0.index].path), \(Format.bytes($0.virtualSizeBytes)))"
        }.joined(separator: ", "))
        let started = track.elapsed
        let deadline = ContinuousClock.now + options.timeout
        try blockJobs.waitReady(copies.map(\.job), deadline: deadline) { () throws(MigrateError) in
            try interrupt.check()
            takeLinkNotes()
            while let event = events.next(timeout: .zero) { try handleDuringDiskCopy(event, transport: transport) }
            guard track.elapsed - lastDiskProgress >= Self.progressPollInterval else { return }
            lastDiskProgress = track.elapsed
            let jobs = Self.diskJobs(qmp)
            showDiskProgress(copies, jobs: jobs, transport: transport)
            steerDiskCopies(jobs, dataPath: transport.dataPath, qmp: qmp)
        }
        let bytes = copies.reduce(UInt64(0)) { $0 + transport.dataPath.byteCount(ofStream: $1.stream) }
        let seconds = max(0.001, track.elapsed - started)
        track.journal.diskCopySeconds = seconds
        track.note(String(format: "disks caught up: %@ sent in %.1f s (%@); their copies now follow the guest's writes",
                          Format.bytes(bytes), seconds, Format.rate(Double(bytes) * 8 / seconds)))
    }

    /// A mirror job's progress as QEMU reports it: `offset` of `length` gone over.
    struct MirrorProgress {
        var offset: UInt64
        var length: UInt64
        /// What it has yet to copy: dirty bytes plus those in flight.
        var remaining: UInt64 { length &- min(offset, length) }
    }

    /// QEMU's mirror jobs' progress, by job id; empty if QEMU did not answer.
    static func diskJobs(_ qmp: QMPClient) -> [String: MirrorProgress] {
        var jobs: [String: MirrorProgress] = [:]
        for job in (try? qmp.execute("query-block-jobs"))?.array ?? [] {
            guard let id = job["device"]?.string else { continue }
            jobs[id] = MirrorProgress(offset: UInt64(max(0, job["offset"]?.double ?? 0)), length: UInt64(max(0, job["len"]?.double ?? 0)))
        }
        return jobs
    }

    /// Keeps each copy converging: fed what its mirror has left and what its stream carried,
    /// its ``DiskConvergence`` may limit the guest's writes to that disk, which Ferry sets
    /// in QEMU (`block_set_io_throttle`) and the report shows. A limit QEMU refuses is
    /// noted; the copy goes on without it.
    func steerDiskCopies(_ jobs: [String: MirrorProgress], dataPath: SourceDataPath, qmp: QMPClient) {
        for copy in diskCopies {
            // A job that has not yet copied anything is still marking what to copy (its
            // `len` grows from 0 to the whole disk): no measure of convergence yet.
            guard let job = jobs[copy.job], job.offset > 0, var convergence = diskConvergence[copy.index] else { continue }
            let decision = convergence.observe(now: track.elapsed, remaining: job.remaining,
                                               sent: dataPath.byteCount(ofStream: copy.stream))
            diskConvergence[copy.index] = convergence
            guard case .limit(let limit, let remaining, let rate) = decision else { continue }
            let disk = DiskSpec.guestName(copy.index)
            do {
                try Self.setWriteLimit(copy.index, bytesPerSecond: limit, granularity: copy.granularity, qmp: qmp)
                track.journal.diskWriteLimits[disk] = limit
                track.note("\(disk)'s copy is not converging (\(Format.bytes(remaining)) left, copied at \(Format.bytes(UInt64(rate)))/s): "
                           + "the guest's writes to \(disk) are limited to \(Format.bytes(limit))/s until the migration ends")
            } catch {
                // Not asked again: the copy goes on, and converges or times out.
                diskConvergence[copy.index] = nil
                track.note("warning: cannot limit the guest's writes to \(disk) for its copy to converge: \(error)")
            }
        }
    }

    /// Sets the guest's write limit on disk `index` (0: none), through QEMU's I/O throttle
    /// (QEMU 7.2 wants all six limits given): `bytesPerSecond`, and as many writes a second
    /// as fill it at the mirror's `granularity`, since each write dirties at least that
    /// much, however small it is.
    static func setWriteLimit(_ index: Int, bytesPerSecond: UInt64, granularity: UInt64, qmp: QMPClient) throws {
        let writes = bytesPerSecond == 0 ? 0 : max(1, bytesPerSecond / granularity)
        try qmp.execute("block_set_io_throttle", arguments: [
            // The virtio device's backend, which holds the disk (QEMU 7.2 does not find it
            // from the PCI device's id alone).
            "id": .string("/machine/peripheral/\(DiskImage.deviceName(index))/virtio-backend"),
            "bps": 0, "bps_rd": 0, "bps_wr": .number(Double(bytesPerSecond)), "iops": 0, "iops_rd": 0, "iops_wr": .number(Double(writes)),
        ])
    }

    /// After the migration (a rollback): the guest writes at its own pace again.
    func liftDiskWriteLimits() {
        guard !track.journal.diskWriteLimits.isEmpty, let qmp = qemu?.qmp else { return }
        for index in diskCopies.map(\.index) where track.journal.diskWriteLimits[DiskSpec.guestName(index)] != nil {
            do {
                try Self.setWriteLimit(index, bytesPerSecond: 0, granularity: 1, qmp: qmp)
            } catch {
                track.note("warning: cannot lift the limit on the guest's writes to \(DiskSpec.guestName(index)) (`ferry migrate` lifts it the next time): \(error)")
            }
        }
    }

    /// The NBD connection of one copy: Ferry listens where QEMU's NBD client connects, and
    /// makes the connection a two-way stream as soon as it comes (QEMU's `blockdev-add`
    /// returns only once the NBD handshake has crossed it, so the accept runs apart).
    private func connectCopy(_ copy: DiskCopy, transport: SourceTransport, qmp: QMPClient, link: ControlLink) throws(MigrateError) {
        let listener: Socket
        do {
            try? FileManager.default.removeItem(atPath: copy.socketPath)
            listener = try Socket.listenUnix(path: copy.socketPath)
        } catch {
            throw .disks("cannot listen for the disk copy's NBD client at \(copy.socketPath): \(error)")
        }
        defer { listener.close(); try? FileManager.default.removeItem(atPath: copy.socketPath) }
        let opened = Locked<String?>(nil)
        let acceptor = startThread("ferry-nbd-\(copy.index)") { [dataPath = transport.dataPath] in
            do {
                guard let socket = try listener.accept(timeout: .seconds(30)) else {
                    opened.withLock { $0 = "QEMU's NBD client did not connect" }
                    return
                }
                // Ahead of memory, both ways: what a copy still owes at the pause is copied
                // in the pause, and an NBD reply late behind memory holds its mirror back.
                try dataPath.openTwoWay(stream: copy.stream, socket: socket, priority: 1)
                try link.send(.streamOpen, StreamOpenMessage(stream: copy.stream, kind: .nbd, target: String(copy.index), priority: 1))
                opened.withLock { $0 = "" }
            } catch {
                opened.withLock { $0 = "\(error)" }
            }
        }
        do {
            try qmp.execute("blockdev-add", arguments: [
                "driver": "nbd", "node-name": .string(copy.target), "export": .string(DiskImage.nodeName(copy.index)),
                "server": ["type": "unix", "path": .string(copy.socketPath)],
            ], timeout: .seconds(30))
        } catch {
            // What Ferry's end saw first (before the listener is shut, which its accept
            // would only report as such), then QEMU's refusal.
            let why = opened.current.flatMap { $0.isEmpty ? nil : $0 }
            listener.shutdown()
            _ = acceptor
            throw .disks("cannot connect disk \(DiskSpec.guestName(copy.index))'s copy to the destination: \(error)"
                         + (why.map { " (\($0))" } ?? ""))
        }
    }

    /// Events while the disks copy: the destination's frames (an error ends the copy), the
    /// data path's (a stream's end, a failure), notes.
    private func handleDuringDiskCopy(_ event: Event, transport: SourceTransport) throws(MigrateError) {
        switch event {
        case .frame(let frame):
            switch frame.type {
            case .error:
                throw destinationFailure(frame)
            case .status:
                break
            case .limit:
                applyLimit(frame, scheduler: transport.scheduler)
            default:
                throw .protocolViolation("the destination sent an unexpected \(frame.type) frame while the disks copied")
            }
        case .controlLost(let why): throw .controlLost(why)
        case .dataPath(.failed(let failure)): throw .dataPath(failure)
        case .dataPath(.channelFailed(let ch, let nic, let reason, let requeued)):
            noteChannelFailed(ch, nic, reason, requeued)
        case .dataPath: break
        case .note(let text): track.note(text)
        case .interrupted: try interrupt.check()
        case .qemuStopped, .qemuStatus, .streamAccepted, .libvirtFinished: break  // QEMU's migration has not started
        }
    }

    private func showDiskProgress(_ copies: [DiskCopy], jobs: [String: MirrorProgress], transport: SourceTransport) {
        // QEMU's account: how much of each disk the mirror has gone over.
        var done: UInt64 = 0, total: UInt64 = 0
        for copy in copies {
            guard let job = jobs[copy.job] else { continue }
            done += job.offset
            total += job.length
        }
        let bytes = transport.dataPath.streamByteCount
        let stats = transport.dataPath.channelStats
        track.journal.timeline.append(diskSampler.sample(now: track.elapsed, streamBytes: bytes, channels: stats))
        track.show(streamBytes: bytes, bitsPerSecond: diskSampler.bitsPerSecond,
                   channels: stats, interfaceBitsPerSecond: diskSampler.interfaceBitsPerSecond,
                   note: total > 0 ? String(format: "disks %.0f%% (%@ of %@ gone over)", Double(done) / Double(total) * 100,
                                             Format.bytes(done), Format.bytes(total)) : "disks: starting the copies")
    }

    /// While memory moves: a copy's mirror that has ended before the switchover failed
    /// (QEMU could not read the source image, or its NBD client lost the destination).
    func checkDiskCopies() throws(MigrateError) {
        guard let (id, error) = blockJobs.firstEnded(diskCopies.map(\.job)) else { return }
        throw .disks("disk copy \(id) failed while memory moved: \(error ?? "no reason given")")
    }

    /// At the switchover (QEMU paused before it sends the device state, `pre-switchover`):
    /// every copy holds every write the guest made, so each mirror is completed without a
    /// pivot (`block-job-cancel` of a ready mirror), its NBD client closed, and only then
    /// does QEMU go on to send the device state (`migrate-continue`).
    func finishDiskCopies(_ qmp: QMPClient) throws(MigrateError) {
        let copies = diskCopies
        let started = Date().timeIntervalSince1970
        // What the copies still owe (the guest's last writes, and those in flight).
        let jobs = Self.diskJobs(qmp)
        let owed = copies.reduce(UInt64(0)) { $0 + (jobs[$1.job]?.remaining ?? 0) }
        do {
            for copy in copies { try qmp.execute("block-job-cancel", arguments: ["device": .string(copy.job)]) }
        } catch {
            throw .disks("cannot finish the disk copies: \(error)")
        }
        try blockJobs.waitEnded(copies.map(\.job), timeout: .seconds(30))
        let ended = Date().timeIntervalSince1970
        do {
            for copy in copies { try qmp.execute("blockdev-del", arguments: ["node-name": .string(copy.target)]) }
            try qmp.execute("migrate-continue", arguments: ["state": "pre-switchover"])
        } catch {
            throw .disks("cannot go on past the disk copies: \(error)")
        }
        diskCopiesFinished = true
        let now = Date().timeIntervalSince1970
        track.journal.switchover.disksFinished = now
        track.note(String(format: "disk copies complete (%.1f ms in the pause: %@ owed at the stop, copied and flushed in %.1f ms, NBD closed in %.1f ms)",
                          (now - started) * 1000, Format.bytes(owed), (ended - started) * 1000, (now - ended) * 1000))
    }

    /// After a failure: the mirrors stop (the source image was never touched by them) and
    /// their NBD clients go. Best effort: QEMU keeps running the guest either way.
    ///
    /// A forced cancel does not end NBD requests already sent: with the destination gone
    /// (every NIC down) they would wait for replies that never come, the job would not end,
    /// and its NBD node could not be removed (the next migration's `blockdev-add` would then
    /// find it). So a mirror that has not ended within a second loses its NBD connection:
    /// Ferry shuts its end of the socket, the requests fail, and the job ends.
    func abandonDiskCopies() {
        guard let qmp = qemu?.qmp, !diskCopies.isEmpty, !diskCopiesFinished else { return }
        let jobs = diskCopies.map(\.job)
        for copy in diskCopies where !blockJobs.hasEnded(copy.job) {
            _ = try? qmp.execute("block-job-cancel", arguments: ["device": .string(copy.job), "force": true])
        }
        if !blockJobs.waitAllEnded(jobs, timeout: .seconds(1)) {
            for copy in diskCopies where !blockJobs.hasEnded(copy.job) { transport?.dataPath.shutdownStream(copy.stream) }
            _ = blockJobs.waitAllEnded(jobs, timeout: .seconds(10))
        }
        for copy in diskCopies { removeCopyNode(copy.target, qmp: qmp) }
    }

    /// What an earlier attempt left in the source QEMU when it could not clean up (its
    /// `ferry migrate` killed): a mirror job of Ferry's (`ferry-copy-N`) is cancelled, a
    /// copy's NBD node (`diskN-copy`) removed, so that this attempt can make its own, and a
    /// limit on the guest's writes lifted (Ferry's VMs have none of their own).
    func clearLeftoverCopies(_ qmp: QMPClient, spec: VMSpec) {
        let jobs = ((try? qmp.execute("query-block-jobs"))?.array ?? []).compactMap { $0["device"]?.string }
            .filter { $0.hasPrefix("ferry-copy-") }
        if !jobs.isEmpty {
            track.note("cancelling disk copies an earlier attempt left running in the source QEMU: \(jobs.joined(separator: ", "))")
            for job in jobs { _ = try? qmp.execute("block-job-cancel", arguments: ["device": .string(job), "force": true]) }
            _ = blockJobs.waitAllEnded(jobs, timeout: .seconds(10))
            blockJobs.forget(jobs)
        }
        let nodes = ((try? qmp.execute("query-named-block-nodes"))?.array ?? []).compactMap { $0["node-name"]?.string }
            .filter { $0.hasPrefix("disk") && $0.hasSuffix("-copy") }
        for node in nodes {
            track.note("removing the NBD node \(node) an earlier attempt left in the source QEMU")
            removeCopyNode(node, qmp: qmp)
        }
        let limited = ((try? qmp.execute("query-block"))?.array ?? []).filter { block in
            ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"].contains { (block["inserted"]?[$0]?.double ?? 0) > 0 }
        }.compactMap { $0["qdev"]?.string }
        for index in spec.disks.indices {
            let device = DiskImage.deviceName(index)
            guard limited.contains(where: { $0 == device || $0.contains("/\(device)/") }) else { continue }
            track.note("lifting the limit on the guest's writes to \(DiskSpec.guestName(index)) an earlier attempt left in the source QEMU")
            try? Self.setWriteLimit(index, bytesPerSecond: 0, granularity: 1, qmp: qmp)
        }
    }

    /// Removes a copy's NBD node; one that is not there is fine.
    func removeCopyNode(_ node: String, qmp: QMPClient) {
        do {
            try qmp.execute("blockdev-del", arguments: ["node-name": .string(node)])
        } catch {
            let text = "\(error)"
            if !text.contains("Failed to find node") && !text.contains("Cannot find node") {
                track.note("warning: cannot remove the disk copy's NBD node \(node) from the source QEMU: \(text)")
            }
        }
    }
}

extension SourceMigration {
    /// The report's disks: where each is on both hosts and what its copy carried.
    func diskReports(spec: VMSpec?, succeeded: Bool) -> [MigrationReport.Disk]? {
        guard let spec, !spec.disks.isEmpty else { return nil }
        return spec.disks.enumerated().map { i, disk in
            let copy = diskCopies.first { $0.index == i }
            return MigrationReport.Disk(
                name: DiskSpec.guestName(i), format: disk.format.rawValue, virtualSizeBytes: disk.virtualSizeBytes, shared: disk.shared,
                sourcePath: disk.path, destinationPath: i < destinationDiskPaths.count ? destinationDiskPaths[i] : nil,
                copiedBytes: copy.map { transport?.dataPath.byteCount(ofStream: $0.stream) ?? 0 },
                copySeconds: copy == nil ? nil : track.journal.diskCopySeconds,
                writeLimitBytesPerSecond: track.journal.diskWriteLimits[DiskSpec.guestName(i)],
                staleSourceImage: succeeded && !disk.shared ? disk.path : nil)
        }
    }
}
