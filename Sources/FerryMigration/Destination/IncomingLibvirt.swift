import FerryIO
import FerryLibvirt
import FerryTransport
import FerryWire
import Foundation

/// Where a libvirt migration's Unix sockets live: `/run/ferry/libvirt/<directory>/` on
/// both hosts (libvirt names one path for both ends of each socket). Both are root's; QEMU,
/// which may run as another user (Debian's libvirt-qemu), may pass through them (0711) but
/// not list them, and reaches only the sockets libvirt gives it: at the source libvirt
/// hands Ferry's sockets to QEMU's user; at the destination the session's directory
/// belongs to QEMU's user (0700), so that its QEMU can bind its sockets there.
public enum LibvirtRun {
    /// libvirtd's read-write socket in system mode (`ferry serve --libvirt-socket`).
    public static let defaultSocket = "/run/libvirt/libvirt-sock"

    /// `FERRY_LIBVIRT_RUN_DIR` for tests on one host; `/run/ferry/libvirt` otherwise.
    public static var root: String {
        ProcessInfo.processInfo.environment["FERRY_LIBVIRT_RUN_DIR"] ?? "/run/ferry/libvirt"
    }

    public static func directory(_ name: String) -> String { root + "/" + name }

    /// Makes the session's directory (and the root); fails if it exists already (a
    /// directory name is fresh for each session). `owner`: QEMU's user and group, who gets
    /// the directory (the destination); nil keeps it root's, 0711 (the source).
    static func makeDirectory(_ name: String, owner: (uid: UInt32, gid: UInt32)? = nil) throws -> String {
        guard LibvirtOfferMessage.isDirectoryName(name) else { throw LibvirtRunError("'\(name)' is not a migration directory's name") }
        let root = self.root
        if mkdir(root, 0o711) != 0 && errno != EEXIST {
            // The parent may be missing (a fresh /run): make it, then the root again.
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o711])
        }
        var info = stat()
        guard lstat(root, &info) == 0, info.st_mode & S_IFMT == S_IFDIR, info.st_uid == getuid() else {
            throw LibvirtRunError("\(root) is not a directory of this user's")
        }
        if info.st_mode & 0o777 != 0o711 { chmod(root, 0o711) }
        let path = directory(name)
        guard mkdir(path, 0o711) == 0 else { throw LibvirtRunError("cannot make \(path): \(errnoDescription(errno))") }
        if let owner {
            guard chown(path, owner.uid, owner.gid) == 0, chmod(path, 0o700) == 0 else {
                let why = errnoDescription(errno)
                rmdir(path)
                throw LibvirtRunError("cannot give \(path) to QEMU's user \(owner.uid):\(owner.gid): \(why)")
            }
        }
        return path
    }

    /// Removes a session's directory and its sockets.
    static func removeDirectory(_ path: String) {
        try? FileManager.default.removeItem(atPath: path)
    }
}

struct LibvirtRunError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// What a destination knows of a libvirt migration it carries.
struct IncomingLibvirt {
    let offer: LibvirtOfferMessage
    /// The session's migration directory here (the same path as on the source).
    let directory: String
    /// The libvirtd this host's `--libvirt-socket` names.
    let libvirtSocket: String
    /// The name the server accounts the session under (never a Ferry VM's: those have no colon).
    var accountName: String { "libvirt:" + offer.domain }
}

extension DestinationSession {
    /// A libvirt domain's migration (protocol v8): libvirt runs it; this host connects the
    /// streams the source opens to its libvirtd and to the sockets its QEMU listens on in
    /// the session's directory, and carries them until the source says libvirt finished
    /// (`commit`) or gave up (`abort`). Nothing here decides the switchover: when the
    /// session dies, its sockets close, and libvirt aborts the migration on both hosts.
    func runLibvirt(_ frame: Frame) throws(IncomingError) {
        guard version >= ProtocolVersion.libvirt else {
            throw .peer(.wire(.unexpectedFrame(frame.type, expected: "offer or resolve (protocol v\(version))")))
        }
        let offer = try peer { try ControlCoding.decode(LibvirtOfferMessage.self, from: frame) }
        guard let socket = server.options.libvirtSocket else {
            throw .refused(.badOffer, "\(HostInfo.hostname) takes no libvirt migrations (its ferry serve runs with --libvirt-socket none)")
        }
        guard LibvirtOfferMessage.isDirectoryName(offer.directory) else {
            throw .refused(.badOffer, "the migration directory's name must be 32 hex digits")
        }
        guard offer.parallelConnections >= 0 && offer.parallelConnections <= 64 else {
            throw .refused(.badOffer, "\(offer.parallelConnections) parallel connections is out of range (0-64)")
        }
        // libvirtd must be there: a probe connection, closed at once.
        do {
            try Socket.connectUnix(path: socket).close()
        } catch {
            throw .refused(.badOffer, "libvirtd is not running on \(HostInfo.hostname): cannot connect to \(socket) (\(error))")
        }
        // QEMU binds its sockets in the directory: it is QEMU's user's (libvirt says who).
        let qemuOwner = (try? Libvirt.load().connect("qemu+unix:///system?socket=\(socket)"))?.qemuOwner()
        let directory: String
        do {
            directory = try LibvirtRun.makeDirectory(offer.directory, owner: qemuOwner)
        } catch {
            throw .refused(.badOffer, "cannot make the migration directory on \(HostInfo.hostname): \(error)")
        }
        defer { LibvirtRun.removeDirectory(directory) }
        let incoming = IncomingLibvirt(offer: offer, directory: directory, libvirtSocket: socket)
        libvirt = incoming
        let account = incoming.accountName
        try peer { try server.register(self, name: account, memoryMiB: 0) }
        try sendAccept(missingFiles: [], diskPaths: [])
        let link = openLink(linkTimeoutSeconds: offer.linkTimeoutSeconds)
        acceptedAt = .now
        server.options.onIncoming?(.started(vm: account))
        logger.info("incoming libvirt migration accepted", metadata: [
            "domain": "\(offer.domain)", "from": "\(sourceHost)", "directory": "\(directory)", "copyStorage": "\(offer.copyStorage)",
        ])
        try move(to: .carrying)
        let dataPath = DestinationDataPath(
            streamCount: 0, twoWay: true, cpus: server.options.cpus ?? CPUSet.automatic(), logger: logger,
            connector: { _ in throw TransportError.protocolViolation("a libvirt session has no one-way streams") },
            onFailure: { [events] error in events.post(.dataFailed(error)) })
        dataPath.onReverseEvent = { [events] event in
            switch event {
            case .streamEnded(let end): events.post(.reverseEnded(end))
            case .failed(let error): events.post(.dataFailed(error))
            default: break
            }
        }
        self.dataPath = dataPath
        try peer { try link.send(.ready, ReadyMessage(qemuVersion: "libvirtd at \(socket)")) }
        server.startedTransfer(self)
        link.startPump("ferry-control-rx", frame: { [events] in events.post(.frame($0)) },
                       lost: { [events] in events.post(.controlLost($0)) })
        while true {
            switch events.next(timeout: .milliseconds(500)) {
            case .frame(let frame)?:
                if try handleLibvirt(frame, dataPath: dataPath, link: link) { return }
            case .controlLost(let why)?:
                throw .sourceGone("lost the source (\(why))")
            case .dataFailed(let error)?:
                throw .dataPath(error)
            case .reverseEnded(let end)?:
                try peer { try link.send(.streamEnd, end) }
            case .qemuStatus?, .streamsComplete?, nil:
                break
            }
        }
    }

    /// One control frame of a libvirt session; true once the source says libvirt finished.
    private func handleLibvirt(_ frame: Frame, dataPath: DestinationDataPath, link: ControlLink) throws(IncomingError) -> Bool {
        switch frame.type {
        case .streamOpen:
            let open = try peer { try ControlCoding.decode(StreamOpenMessage.self, from: frame) }
            try openLibvirtStream(open, dataPath: dataPath)
        case .streamEnd:
            try endStream(try peer { try ControlCoding.decode(StreamEndMessage.self, from: frame) }, dataPath: dataPath)
        case .commit:
            // libvirt finished: the domain runs here (libvirt's Finish step is done).
            try move(to: .committed)
            let reply = CommittedMessage(ferryCPUSeconds: ProcessStats.ownCPUSeconds() - ferryCPUStart, qemuCPUSeconds: 0,
                                         receivedByteCount: dataPath.receivedByteCount,
                                         ferryPeakRSSBytes: ProcessStats.peakRSSBytes(pid: getpid()) ?? 0, waits: dataPath.waits)
            try peer { try link.send(.committed, reply) }
            link.drain(timeout: .seconds(1))
            logger.info("libvirt migration finished", metadata: ["domain": "\(libvirt?.offer.domain ?? "?")",
                                                                 "received": "\(dataPath.receivedByteCount)"])
            return true
        case .abort:
            throw try sourceAborted(frame)
        case .error:
            throw sourceFailed(frame)
        case .status:
            break
        default:
            throw .protocolViolation("unexpected \(frame.type) frame in a libvirt session")
        }
        return false
    }

    /// Connects a stream to what its target names here, never to a path the peer chose.
    /// Done on the session's thread as each `streamOpen` arrives, so the connections reach
    /// libvirtd and QEMU in the order the source accepted them (QEMU 7.2 takes the first
    /// migration connection for its main channel).
    private func openLibvirtStream(_ open: StreamOpenMessage, dataPath: DestinationDataPath) throws(IncomingError) {
        guard let libvirt, open.kind == .libvirt, let target = open.target.flatMap(LibvirtTarget.init(rawValue:)) else {
            throw .protocolViolation("stream \(open.stream) of kind \(open.kind?.rawValue ?? "migration") for \(open.target ?? "nothing"): "
                + "a libvirt session carries only libvirt streams")
        }
        if target == .disks && !libvirt.offer.copyStorage {
            throw .protocolViolation("a disk stream in a libvirt migration without a storage copy")
        }
        let path = target.socketName.map { libvirt.directory + "/" + $0 } ?? libvirt.libvirtSocket
        let socket: Socket
        do {
            socket = try Socket.connectUnix(path: path)
        } catch {
            let what = target == .libvirtd ? "libvirtd" : "the destination QEMU's \(target.rawValue) socket"
            throw .dataPath(.aborted("cannot connect a libvirt \(target.rawValue) stream to \(what) at \(path): \(error)"))
        }
        if target != .libvirtd { socket.setSendBuffer(ChunkPolicy.qemuSocketBufferByteCount) }
        do {
            try dataPath.openTwoWay(stream: open.stream, socket: socket, priority: open.priority ?? 0)
        } catch {
            socket.close()
            throw .dataPath(error)
        }
        logger.info("libvirt stream connected", metadata: ["domain": "\(libvirt.offer.domain)", "stream": "\(open.stream)",
                                                           "target": "\(target.rawValue)"])
    }
}
