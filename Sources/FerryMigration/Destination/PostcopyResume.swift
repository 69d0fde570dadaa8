import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation

// The destination's half of resuming a postcopy migration (protocol v7): the VM runs here
// since the commit of an earlier session, which a daemon's crash ended; its QEMU paused the
// migration when its streams closed. A new session from the same source carries the rest.
extension DestinationSession {
    /// How long QEMU may take to pause its migration once its old streams are gone.
    static let postcopyPauseWait: Duration = .seconds(10)

    /// Step (instead of the offer's usual steps): checks that the VM here is the one that
    /// committed into postcopy in session `original` and still lacks pages, supersedes the
    /// session that carried it if it still waits here, has QEMU listen again
    /// (`migrate-recover`), accepts, and feeds QEMU until it has every page. Nothing here
    /// stops or discards the VM: a failure leaves it running and waiting for another resume.
    func resumePostcopy(_ offer: OfferMessage, session original: String) throws(IncomingError) {
        let name = offer.spec.name
        sourceDaemon = (Reconciler.host(ofPeer: control.peer), offer.sourcePort ?? 7470)
        guard version >= ProtocolVersion.postcopyResume else {
            throw .refused(.badOffer, "resuming a postcopy migration needs protocol v\(ProtocolVersion.postcopyResume); this session speaks v\(version)")
        }
        if let problem = VMSpec.validateName(name) { throw .refused(.badOffer, problem) }
        try move(to: .resuming)
        spec = offer.spec
        server.supersedePostcopy(vm: name, by: self)
        let here = HostInfo.hostname
        let record: VMRecord
        do {
            record = try store.record(name)
        } catch {
            throw .refused(.badOffer, "there is no VM '\(name)' on \(here) to resume (\(error))")
        }
        guard record.state.session == original else {
            throw .refused(.badOffer, "the VM '\(name)' on \(here) did not arrive by the migration being resumed (session \(original.prefix(8)))")
        }
        guard record.alive else {
            throw .refused(.badOffer, "the VM '\(name)' no longer runs on \(here): its QEMU is gone, and with it the pages it had; postcopy cannot be resumed")
        }
        qemuPID = record.state.pid
        try peer { try server.register(self, name: name, memoryMiB: 0) }
        do {
            vmLock = try VMLock(paths: record.paths, name: name)
        } catch {
            throw .refused(.vmExists, "the VM '\(name)' on \(here) is held by another task (\(error))")
        }
        // Through the relay the session that switched started, which negotiated QEMU's
        // out-of-band commands: QEMU's main thread may be blocked behind a vCPU waiting for
        // a page. Without one (it died), directly.
        let qmp: QMPClient
        do {
            qmp = try QMPClient(path: record.paths.qmpRelaySocket, timeout: .seconds(5), outOfBand: true)
        } catch {
            do {
                qmp = try QMPClient(path: record.paths.qmpSocket, timeout: .seconds(10), outOfBand: true)
            } catch {
                throw .qemu("cannot reach the QEMU of '\(name)': \(error) (its monitor's relay is gone too; QEMU's main thread may be blocked on a missing page)")
            }
        }
        self.qmp = qmp
        watch(qmp)
        let incoming = record.paths.incomingSocket
        try recover(qmp, name: name, uri: "unix:\(incoming)")
        try sendAccept(missingFiles: [], diskPaths: record.spec.disks.map(\.path))
        _ = openLink(offer)
        logger.info("resuming a postcopy migration", metadata: ["vm": "\(name)", "from": "\(sourceHost)", "session": "\(original.prefix(8))"])
        var streams = offer.streams
        streams.multifdChannels = 0
        let dataPath = makeDataPath(streams, incomingPath: incoming)
        self.dataPath = dataPath
        postcopy = true
        try announceReady(qmp)
        try finishPostcopy(dataPath: dataPath, qmp: qmp, name: name)
        try move(to: .committed)
    }

    /// Has QEMU listen again for the rest of its memory (`migrate-recover`, out of band):
    /// once its migration is paused, which it is once the old streams closed; asks it to
    /// pause (`migrate-pause`, out of band) if it still counts itself active after a
    /// second. `query-migrate` runs on QEMU's main thread, which may be blocked: only the
    /// out-of-band commands are relied on. Refuses a VM whose migration completed or is
    /// not a postcopy.
    private func recover(_ qmp: QMPClient, name: String, uri: String) throws(IncomingError) {
        let started = Stopwatch()
        var pauseAsked = false
        while true {
            do {
                try qmp.execute("migrate-recover", arguments: ["uri": .string(uri)], timeout: .seconds(5), outOfBand: true)
                return
            } catch {
                guard case .command(_, let description) = error.kind else {
                    throw .qemu("the destination QEMU would not listen for the rest of its memory (migrate-recover): \(error)")
                }
                // Not paused (yet): what QEMU says of its migration, if its main thread answers.
                if let info = try? qmp.queryMigrate(timeout: .milliseconds(500)) {
                    switch info.status {
                    case .completed:
                        throw .refused(.badOffer, "the VM '\(name)' has every page already: its migration completed")
                    case .postcopyActive, .postcopyPaused, .postcopyRecover:
                        break
                    default:
                        throw .refused(.badOffer, "the VM '\(name)' is not in a postcopy migration here (QEMU says \(info.status.qemuName))")
                    }
                }
                if !pauseAsked && started.elapsed >= 1 {
                    pauseAsked = true
                    _ = try? qmp.execute("migrate-pause", timeout: .seconds(5), outOfBand: true)
                }
                guard started.elapsed < Self.postcopyPauseWait.seconds else {
                    throw .qemu("the destination QEMU would not take the rest of its memory within \(Int(Self.postcopyPauseWait.seconds)) s: \(description)")
                }
                usleep(100_000)
            }
        }
    }

    /// Starts the relay for QEMU's monitor (``QMPRelay``, `ferry qmp-relay`, a process of
    /// its own) in place of the direct connection `direct`, and connects to it with
    /// out-of-band commands.
    func relayQMP(_ direct: QMPClient, paths: VMPaths) throws(IncomingError) -> QMPClient {
        direct.close()  // QEMU's monitor takes one client at a time: the relay's from now on
        let process: Process
        do {
            process = try Command.startOwn(["qmp-relay", "--qemu", paths.qmpSocket, "--listen", paths.qmpRelaySocket], log: paths.qmpRelayLog)
        } catch {
            throw .qemu("cannot start the relay of QEMU's monitor: \(error)")
        }
        let started = Stopwatch()
        while true {
            if let qmp = try? QMPClient(path: paths.qmpRelaySocket, timeout: .seconds(5), outOfBand: true) { return qmp }
            guard started.elapsed < 10, process.isRunning else {
                let said = (try? String(contentsOfFile: paths.qmpRelayLog, encoding: .utf8)) ?? ""
                throw .qemu("the relay of QEMU's monitor did not start: \(said.suffix(300))")
            }
            usleep(20_000)
        }
    }
}
