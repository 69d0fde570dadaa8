import FerryIO
import FerryInterfaces
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation

/// The source's data path once its channels are open: what carries QEMU's streams.
struct SourceTransport {
    let scheduler: SendScheduler
    let dataPath: SourceDataPath
    let manager: ChannelManager
    let compression: CompressionController
    /// The NIC pairs the channels run over.
    let pairs: [NICPair]
    /// Their speeds together, bits per second (nil: some unknown).
    let linkBitsPerSecond: UInt64?
    /// The report's `data path` line.
    let summary: String
    /// Where QEMU's multifd streams connect (nil with one stream, handed over by getfd).
    var listener: Socket?
    /// What QEMU's single stream was handed (nil: QEMU connected to Ferry's socket).
    var qemuStreamKind: String?

    /// Stops the channels and the data path (the control connection is closed apart).
    func close(reason: String) {
        manager.stop()
        dataPath.shutdown(reason: reason)
        listener?.shutdown()
        listener?.close()
    }
}

extension SourceMigration {
    /// Postcopy: what a data channel's socket may hold unsent (``ChannelManager/Plan/unsentLowWater``).
    /// A page asked for waits behind at most this on the channel it takes, and the channels
    /// still keep the link busy (256 KiB is 2 ms at 1 Gbit/s).
    static let postcopyUnsentLowWater = 256 << 10

    /// The name under which QEMU keeps the socket it migrates into (getfd).
    static let qemuStreamName = "ferry-migration"

    /// Step: pairs this host's NICs with the destination's and opens data channels on
    /// each pair, bound to the session.
    /// `twoWay`: the migration opens two-way streams (its disk copies).
    func openChannels(_ session: NegotiatedSession, control: FrameConnection, twoWay: Bool = false) throws(MigrateError) -> SourceTransport {
        try move(to: .openingChannels)
        let accept = session.accept
        let scheduler = SendScheduler(noChannelGrace: options.linkTimeout)
        scheduler.setRateLimit(bytesPerSecond: options.bandwidthBytesPerSecond)
        let compression = CompressionController(
            mode: options.compression,
            cores: CompressionController.defaultCores(channels: max(1, options.channelsPerEndpoint) * max(1, accept.interfaces.count)),
            origin: track.clock.start)
        let sealed = session.security.keys != nil
        let zeroCopy = options.zeroCopy && !sealed && options.compression == .none && SourceDataPath.zeroCopyAvailable
        let summary = zeroCopy
            ? "zero-copy: spliced through pipes from QEMU's socket to the NICs, kept by reference until acknowledged"
            : "copied: read into pooled buffers" + (sealed ? ", sealed at send time" : "")
                + (options.compression == .none ? "" : ", compressed when it pays")
        let post = sessionSink()
        let dataPath = SourceDataPath(scheduler: scheduler, compression: zeroCopy ? nil : compression, zeroCopy: zeroCopy,
                                      twoWay: twoWay, logger: logger) { event in
            post(.dataPath(event))
        }
        dataPath.stallTimeout = options.stallTimeout
        dataPath.cpus = options.cpus ?? CPUSet.automatic()

        let local = InterfaceDiscovery.list(speeds: options.nicSpeeds)
        let match = NICMatcher.match(local: local, remote: accept.interfaces.map(\.networkInterface), localSelection: options.nics)
        var pairs = match.pairs
        let speeds = pairs.map(\.speedBitsPerSecond)
        let linkSpeed = speeds.contains(nil) || speeds.isEmpty ? nil : speeds.compactMap { $0 }.reduce(0, +)
        compression.setLinkSpeed(bitsPerSecond: linkSpeed)
        scheduler.setWindow(byteCount: SwitchoverBudget.startingWindow(linkBitsPerSecond: linkSpeed))
        if pairs.isEmpty {
            // No NIC pair found (e.g. loopback, or the peer hid its NICs): use the path the
            // control connection took.
            let localAddress = control.socket.localAddress ?? "0.0.0.0"
            pairs = [NICPair(localInterface: InterfaceDiscovery.name(holding: localAddress) ?? "default", localAddress: localAddress,
                             remoteInterface: "?", remoteAddress: options.host, speedBitsPerSecond: nil)]
        }
        track.note("NICs: " + pairs.map { p in
            "\(p.localInterface) \(p.localAddress) -> \(p.remoteAddress)" + (p.speedBitsPerSecond.map { " (\(Format.rate(Double($0))))" } ?? "")
        }.joined(separator: ", ") + (match.skipped.isEmpty ? "" : "; left out: " + match.skipped.joined(separator: ", ")))
        let manager = ChannelManager(
            plan: .init(pairs: pairs, port: accept.dataPort == 0 ? options.port : accept.dataPort, session: accept.session,
                        version: session.welcome.version, bindKey: session.bindKey, security: session.security, channelsPerPair: max(1, options.channelsPerEndpoint),
                        connectTimeout: min(options.connectTimeout, .seconds(2)), deadChannelTimeout: options.deadChannelTimeout,
                        unsentLowWater: session.plan.isPostcopy ? Self.postcopyUnsentLowWater : nil),
            dataPath: dataPath, logger: logger, note: { [events] text in events.post(.note(text)) })
        let transport = SourceTransport(scheduler: scheduler, dataPath: dataPath, manager: manager, compression: compression,
                                        pairs: pairs, linkBitsPerSecond: linkSpeed, summary: summary)
        self.transport = transport
        let openErrors = manager.openAll()
        guard scheduler.liveChannelCount > 0 else { throw .noChannels(openErrors) }
        manager.start()
        track.note("\(scheduler.liveChannelCount) data channel(s) bound over \(pairs.count) NIC pair(s)")
        return transport
    }

    /// Step: QEMU's streams go into Ferry's sockets, and QEMU is told to migrate.
    func startQEMU(_ qemu: inout LocalQEMU, transport: SourceTransport, plan: StreamPlan, paths: VMPaths) throws(MigrateError) {
        try move(to: .transferring)
        let uri = try handStreams(to: qemu.qmp, transport: transport, plan: plan, paths: paths)
        try interrupt.check()
        try configure(qemu.qmp, plan: plan)
        FaultPoint.sourceSetup.pause()
        track.journal.migrateIssuedAt = track.elapsed
        do {
            try qemu.qmp.execute("migrate", arguments: ["uri": .string(uri)])
        } catch {
            if plan.streamCount == 1 && !plan.isPostcopy { _ = try? qemu.qmp.execute("closefd", arguments: ["fdname": .string(Self.qemuStreamName)]) }
            throw .qemu(.command(doing: "start the migration", error))
        }
        qemu.migrateStarted = true
        self.qemu = qemu
        do {
            try store.setPhase(name, .migratingOut)
        } catch {
            throw .store(doing: "record the VM as migrating out", (error as? VMError) ?? .io("\(error)"))
        }
        track.note("QEMU started migrating (" + (plan.isPostcopy ? "main + preempt, postcopy possible" : "main + \(plan.multifdChannels) multifd") + ")"
                 + (self.transport?.qemuStreamKind.map { ", into \($0)" } ?? "")
                 + "; its downtime limit is held at \(SwitchoverBudget.heldLimitMilliseconds) ms through its first pass")
    }

    /// QEMU's streams into the data path; returns the URI QEMU migrates to.
    func handStreams(to qmp: QMPClient, transport: SourceTransport, plan: StreamPlan, paths: VMPaths) throws(MigrateError) -> String {
        let dataPath = transport.dataPath
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
                self.transport?.qemuStreamKind = "a socket pair, QEMU's send buffer \((size / 2) >> 10) KiB"
                defer { qemus.close() }  // QEMU holds its own copy once getfd returns
                try qmp.execute("getfd", arguments: ["fdname": .string(Self.qemuStreamName)], passing: qemus.fd)
                dataPath.addStream(0, socket: ours)
                events.post(.streamAccepted(0))
            } catch {
                throw .streamHandOff("cannot hand QEMU its migration stream: \(error)")
            }
            return "fd:\(Self.qemuStreamName)"
        }
        // QEMU 7.2 opens multifd channels only to socket addresses: it connects to ours,
        // the main channel first (the destination tells them apart by that order).
        let listener: Socket
        do {
            listener = try Socket.listenUnix(path: paths.outgoingSocket)
        } catch {
            throw .streamHandOff("cannot listen for QEMU's streams: \(error)")
        }
        self.transport?.listener = listener
        let post = sessionSink()
        startThread("ferry-accept") { [dataPath] in
            for id in 0..<UInt32(plan.streamCount) {
                guard let socket = try? listener.accept() else { return }
                if plan.isPostcopy {
                    // Postcopy: the main stream brings the destination's page requests back
                    // (QEMU's return path); the preempt channel carries the pages asked for,
                    // ahead of everything else.
                    do {
                        try dataPath.addTwoWayMigrationStream(id, socket: socket, priority: id == StreamPlan.preemptStream ? 1 : 0)
                    } catch {
                        post(.dataPath(.failed((error as? TransportError) ?? .aborted("\(error)"))))
                        return
                    }
                } else {
                    dataPath.addStream(id, socket: socket)
                }
                post(.streamAccepted(id))
            }
        }
        return "unix:\(paths.outgoingSocket)"
    }

    private func configure(_ qmp: QMPClient, plan: StreamPlan) throws(MigrateError) {
        do {
            // x-ignore-shared off, explicitly: guest RAM is a shared memory backend (for
            // same-host updates), and across hosts it must be sent, not left out.
            // pause-before-switchover with disks being copied: QEMU stops the guest and waits
            // (`pre-switchover`) before it sends the device state, so that the copies can be
            // completed first (``finishDiskCopies``).
            // auto-converge: QEMU throttles the vCPUs when a pass dirties too much, with the
            // parameters Ferry sets from what it measures (``ConvergencePolicy``); a
            // capability, so it can only be set before `migrate`.
            // postcopy-ram and postcopy-preempt (both QEMUs, before `migrate`): the migration
            // may switch to postcopy (``startPostcopy``), its requested pages on a channel of
            // their own.
            try qmp.setMigrationCapabilities([("multifd", plan.multifdChannels > 0), ("events", true), ("x-ignore-shared", false),
                                              ("pause-before-switchover", !diskCopies.isEmpty),
                                              ("auto-converge", options.converge != .none && options.converge != .postcopy),
                                              ("postcopy-ram", plan.isPostcopy), ("postcopy-preempt", plan.isPostcopy)])
            var params: [String: JSONValue] = [
                // QEMU 7.2's default cap is 128 MiB/s. Ferry sets the pace (its window, its rate
                // limit across all channels, the links), so QEMU is left uncapped.
                "max-bandwidth": .number(100_000_000_000),
                // Held at 0 through QEMU's first pass; the transfer then gives it its share
                // of the --downtime budget (``SwitchoverBudget``).
                "downtime-limit": .number(Double(SwitchoverBudget.heldLimitMilliseconds)),
            ]
            if plan.multifdChannels > 0 { params["multifd-channels"] = .number(Double(plan.multifdChannels)) }
            if plan.isPostcopy {
                // QEMU's own cap on postcopy's background pages (its default, 0, is none):
                // as for pre-copy, Ferry sets the pace.
                params["max-postcopy-bandwidth"] = .number(0)
            }
            if options.converge == .auto || options.converge == .throttle {
                let policy = ConvergencePolicy(ceiling: options.maxThrottlePercent)
                params["throttle-trigger-threshold"] = .number(Double(ConvergencePolicy.triggerPercent))
                params["max-cpu-throttle"] = .number(Double(policy.ceiling))
                params["cpu-throttle-tailslow"] = .bool(false)
                track.journal.convergence = ConvergenceAccount(mode: options.converge, ceilingPercent: policy.ceiling)
            }
            try qmp.setMigrationParameters(params)
        } catch {
            throw .qemu(.command(doing: "configure QEMU's migration", error))
        }
    }
}
