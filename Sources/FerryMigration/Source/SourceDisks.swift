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
            let (allReady, failed) = monitor.withLock { () -> (Bool, (String, String?)?) in
                (ids.allSatisfy { ready.contains($0) }, ids.lazy.compactMap { id in self.ended[id].map { (id, $0) } }.first)
            }
            if let (id, error) = failed { throw .disks("disk copy \(id) ended before it caught up: \(error ?? "no reason given")") }
            if allReady { return }
            guard ContinuousClock.now < deadline else { throw .disks("the disk copies did not catch up in time") }
            try check()
            _ = monitor.withLock { changed.wait(timeout: .milliseconds(100)) }
        }
    }

    /// Waits until every job of `ids` has ended; throws for one that failed.
    func waitEnded(_ ids: [String], timeout: Duration) throws(MigrateError) {
        let deadline = ContinuousClock.now + timeout
        monitor.lock()
        defer { monitor.unlock() }
        while !ids.allSatisfy({ ended[$0] != nil }) {
            guard ContinuousClock.now < deadline else {
                throw .disks("the disk copies did not finish within \(Int(timeout.seconds)) s of the guest's pause")
            }
            _ = changed.wait(timeout: .milliseconds(50))
        }
        for id in ids { if let error = ended[id] ?? nil { throw .disks("disk copy \(id) failed at the switchover: \(error)") } }
    }

    func hasEnded(_ id: String) -> Bool { monitor.withLock { ended[id] != nil } }
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
    /// over a two-way stream each: the source QEMU mirrors it (`blockdev-mirror`, active:
    /// each guest write completes only once the copy has it too) into an NBD client that
    /// connects to Ferry's socket, and the destination connects the stream to its NBD
    /// server. Returns once every copy has caught up; the mirrors then keep up with the
    /// guest until the switchover (``finishDiskCopies``).
    func copyDisks(_ copies: [DiskCopy], spec: VMSpec, transport: SourceTransport, qmp: QMPClient, link: ControlLink) throws(MigrateError) {
        guard !copies.isEmpty else { return }
        try move(to: .copyingDisks)
        diskCopies = copies
        for copy in copies {
            try connectCopy(copy, transport: transport, qmp: qmp, link: link)
            do {
                try qmp.execute("blockdev-mirror", arguments: [
                    "job-id": .string(copy.job), "device": .string(DiskImage.nodeName(copy.index)), "target": .string(copy.target),
                    // Active: the guest's writes reach the copy before they complete, so the
                    // copy converges whatever the guest's write rate. Zeros go as NBD
                    // write-zeroes requests (no data), which the destination's image, opened
                    // with discard=unmap, keeps sparse.
                    "sync": "full", "copy-mode": "write-blocking",
                ])
            } catch {
                throw .disks("cannot start copying disk \(DiskSpec.guestName(copy.index)): \(error)")
            }
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
            showDiskProgress(copies, transport: transport, qmp: qmp)
        }
        let bytes = copies.reduce(UInt64(0)) { $0 + transport.dataPath.byteCount(ofStream: $1.stream) }
        let seconds = max(0.001, track.elapsed - started)
        track.journal.diskCopySeconds = seconds
        track.note(String(format: "disks caught up: %@ sent in %.1f s (%@); their copies now follow every write",
                          Format.bytes(bytes), seconds, Format.rate(Double(bytes) * 8 / seconds)))
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
                try dataPath.openTwoWay(stream: copy.stream, socket: socket)
                try link.send(.streamOpen, StreamOpenMessage(stream: copy.stream, kind: .nbd, target: String(copy.index)))
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
            listener.shutdown()
            _ = acceptor
            let why = opened.current.flatMap { $0.isEmpty ? nil : $0 }
            throw .disks("cannot connect disk \(DiskSpec.guestName(copy.index))'s copy to the destination: \(why ?? "\(error)")")
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
        case .qemuStopped, .qemuStatus, .streamAccepted: break  // QEMU's migration has not started
        }
    }

    private func showDiskProgress(_ copies: [DiskCopy], transport: SourceTransport, qmp: QMPClient) {
        guard track.elapsed - lastDiskProgress >= Self.progressPollInterval else { return }
        lastDiskProgress = track.elapsed
        // QEMU's account: how much of each disk the mirror has gone over.
        var done: UInt64 = 0, total: UInt64 = 0
        if let jobs = try? qmp.execute("query-block-jobs").array {
            for job in jobs where copies.contains(where: { $0.job == job["device"]?.string }) {
                done += UInt64(job["offset"]?.double ?? 0)
                total += UInt64(job["len"]?.double ?? 0)
            }
        }
        let bytes = transport.dataPath.streamByteCount
        let stats = transport.dataPath.channelStats
        track.journal.timeline.append(diskSampler.sample(now: track.elapsed, streamBytes: bytes, channels: stats))
        track.show(streamBytes: bytes, bitsPerSecond: diskSampler.bitsPerSecond,
                   channels: stats, interfaceBitsPerSecond: diskSampler.interfaceBitsPerSecond,
                   note: total > 0 ? String(format: "disks %.0f%% (%@ of %@ gone over)", Double(done) / Double(total) * 100,
                                             Format.bytes(done), Format.bytes(total)) : "disks: starting the copies")
    }

    /// At the switchover (QEMU paused before it sends the device state, `pre-switchover`):
    /// every copy holds every write the guest made, so each mirror is completed without a
    /// pivot (`block-job-cancel` of a ready mirror), its NBD client closed, and only then
    /// does QEMU go on to send the device state (`migrate-continue`).
    func finishDiskCopies(_ qmp: QMPClient) throws(MigrateError) {
        let copies = diskCopies
        let started = Date().timeIntervalSince1970
        do {
            for copy in copies { try qmp.execute("block-job-cancel", arguments: ["device": .string(copy.job)]) }
        } catch {
            throw .disks("cannot finish the disk copies: \(error)")
        }
        try blockJobs.waitEnded(copies.map(\.job), timeout: .seconds(30))
        do {
            for copy in copies { try qmp.execute("blockdev-del", arguments: ["node-name": .string(copy.target)]) }
            try qmp.execute("migrate-continue", arguments: ["state": "pre-switchover"])
        } catch {
            throw .disks("cannot go on past the disk copies: \(error)")
        }
        diskCopiesFinished = true
        track.journal.switchover.disksFinished = Date().timeIntervalSince1970
        track.note(String(format: "disk copies complete (%.1f ms in the pause)", (Date().timeIntervalSince1970 - started) * 1000))
    }

    /// After a failure: the mirrors stop (the source image was never touched by them) and
    /// their NBD clients go. Best effort: QEMU keeps running the guest either way.
    func abandonDiskCopies() {
        guard let qmp = qemu?.qmp, !diskCopies.isEmpty, !diskCopiesFinished else { return }
        for copy in diskCopies where !blockJobs.hasEnded(copy.job) {
            _ = try? qmp.execute("block-job-cancel", arguments: ["device": .string(copy.job), "force": true])
        }
        _ = try? blockJobs.waitEnded(diskCopies.map(\.job), timeout: .seconds(10))
        for copy in diskCopies { _ = try? qmp.execute("blockdev-del", arguments: ["node-name": .string(copy.target)]) }
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
                staleSourceImage: succeeded && !disk.shared ? disk.path : nil)
        }
    }
}
