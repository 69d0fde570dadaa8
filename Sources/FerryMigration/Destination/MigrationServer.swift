import FerryIO
import FerryInterfaces
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Logging

/// `ferry serve`: accepts migrations into this host, one session per control connection,
/// data channels joining their session by proof. Whatever a peer sends, the server logs
/// it, answers with an error where it can, and goes on serving.
///
/// Threads: the door (accepts on every listener and holds, with poll, each connection
/// until its first frame is there), one per connection from then on (a session's for its
/// whole life), one reconciler; the session threads register and unregister here.
// The session tables, `handshakes`, `handshaking`, `shedHandshakes` and `tally` are under
// `lock`; `reconcileInterval` is set before `run()`; the rest is immutable. The door's
// waiting connections belong to the thread that runs `run()`.
public final class MigrationServer: @unchecked Sendable {
    public struct Options: Sendable {
        /// The addresses to listen on, all on `port`: only these take connections, and
        /// only NICs holding one of them are offered for data channels. "0.0.0.0" or "::"
        /// listens everywhere.
        public var addresses: [String]
        public var port: UInt16
        /// A new connection must send its whole first frame (hello or bind) within this
        /// time. A real source sends it the moment it is connected, one small segment;
        /// 5 s is that segment lost twice (TCP resends after 1 s, then 2 s more) with room
        /// to spare. Until then the connection waits at the door: a descriptor, no thread.
        public var firstFrameTimeout: Duration = .seconds(5)
        /// Each later step of the handshake (the source's `auth`) within this time.
        public var handshakeTimeout: Duration = .seconds(10)
        /// Connections waiting at the door for their first frame, at most (also bounded
        /// by a quarter of RLIMIT_NOFILE). Past it the oldest connection of the address
        /// holding the most is shed: see ``DoorLine``. 512 waiting cost 512 descriptors
        /// and a 512-entry poll; a flood larger than that is shed, not refused.
        public var maxWaitingConnections = 512
        /// Handshakes in progress (a thread each) at most; past it the same shedding.
        /// A genuine handshake takes one round trip and an X25519 (1-8 ms on loopback,
        /// SecurityTests.floods), so 32 is room for a cluster's sources at once; a data
        /// channel's bind leaves the line as soon as its frame is read.
        public var maxPendingConnections = 32
        /// This host's NICs that may carry migrations (default: all but loopback).
        public var nics: NICSelection = .all
        /// Link speeds where the kernel reports none (veth), by interface name.
        public var nicSpeeds: [String: UInt64] = [:]
        /// The most all incoming migrations together may use, bytes per second; each
        /// migration gets an equal share (nil: no limit).
        public var maxBandwidthBytesPerSecond: UInt64?
        /// The cluster keys this host accepts; nil runs insecure (`--insecure`).
        public var keys: KeyRing?
        /// `--cpus`: the cores incoming data paths run on (nil: the default choice).
        public var cpus: CPUSet?
        /// `--max-migrations`: incoming migrations that transfer at once; more wait in line.
        public var maxMigrations = 2
        /// `--disk-dir`: where the disks copied here go, as `DIR/VM/diskN.FORMAT` (nil: the
        /// state root's `disks/`).
        public var diskDirectory: String?
        /// `--max-guest-memory`: the most guest memory this host takes in all, bytes (its
        /// VMs and those arriving); an offer past it is refused (nil: only the host's
        /// memory limits it).
        public var maxGuestMemoryBytes: UInt64?
        /// Told when an incoming migration starts and ends (the daemon's metrics), on the
        /// session's thread: keep it short and never blocking.
        public var onIncoming: (@Sendable (IncomingMigrationNotice) -> Void)?
        /// `--libvirt-socket`: the libvirtd a libvirt migration's control connection is
        /// connected to (nil: this host takes no libvirt migrations).
        public var libvirtSocket: String? = LibvirtRun.defaultSocket
        public init(addresses: [String], port: UInt16) {
            precondition(!addresses.isEmpty)
            self.addresses = addresses
            self.port = port
        }
    }

    public let options: Options
    public let port: UInt16
    let store: VMStore
    let logger: Logger
    let listeners: [Socket]
    let lock = Monitor()
    private var sessions: [String: DestinationSession] = [:]
    private var incomingNames: [String: String] = [:]
    /// Guest memory of each VM arriving, MiB, by name (under `lock`).
    private var incomingMiB: [String: Int] = [:]
    /// Connections in their handshake (identified by the door's number): the line that
    /// sheds, their sockets, and those shed (whose thread then logs nothing of its own).
    var handshakes: DoorLine
    var handshaking: [Int: Socket] = [:]
    var shedHandshakes: Set<Int> = []
    /// Refusals and sheds, for the log at a bounded rate.
    var tally = RefusalTally()
    /// Connections at the door at most: `maxWaitingConnections`, within the descriptors.
    let waitingCapacity: Int
    /// Sessions that are receiving streams, for the host's bandwidth shares.
    private var transferring: [String: DestinationSession] = [:]
    /// `--max-migrations`: who transfers and who waits.
    let admission: AdmissionQueue

    public init(store: VMStore, options: Options, logger: Logger) throws {
        self.store = store
        self.options = options
        self.logger = logger
        self.reconciler = Reconciler(store: store, keys: options.keys, logger: logger)
        var listeners: [Socket] = []
        var port = options.port
        for address in options.addresses {
            // The first listener fixes the port (an ephemeral one if 0); the others use it.
            let listener = try Self.listen(host: address, port: port, logger: logger)
            port = listener.localPort
            listeners.append(listener)
        }
        self.listeners = listeners
        self.port = port
        waitingCapacity = max(16, min(options.maxWaitingConnections, openDescriptorLimit / 4))
        handshakes = DoorLine(capacity: options.maxPendingConnections)
        let runDirectory = store.paths.runDirectory
        admission = AdmissionQueue(limit: options.maxMigrations) { $0.write(runDirectory: runDirectory) }
        admission.snapshot.write(runDirectory: runDirectory)
    }

    /// Settles what a crash left half-done (``Reconciler``): at start, then every
    /// `reconcileInterval` while the daemon runs, leaving alone the VMs its live sessions
    /// are handling. Set the interval before ``run()``.
    public let reconciler: Reconciler
    public var reconcileInterval: Duration = .seconds(2)

    @discardableResult
    public func reconcile() -> [String] {
        let busy = lock.withLock { Set(incomingNames.keys) }
        return reconciler.reconcile(busy: busy)
    }

    /// Accepts connections on every listener until the process ends.
    public func run() -> Never {
        logger.info("ferry serve listening", metadata: ["addresses": "\(options.addresses.joined(separator: ","))", "port": "\(port)",
                                                       "waiting": "\(waitingCapacity)", "handshakes": "\(options.maxPendingConnections)"])
        startThread("ferry-reconcile") { [self] in
            while true {
                Thread.sleep(forTimeInterval: reconcileInterval.seconds)
                reconcile()
            }
        }
        door()
    }

    // MARK: Handshakes

    func handle(_ socket: Socket, id: Int, address: String, refusal: String?) {
        // A source that vanishes (its NICs or host died) is noticed within seconds, not
        // after TCP's minutes of retransmissions.
        socket.setUserTimeout(.seconds(5))
        let connection = FrameConnection(socket: socket)
        socket.setReceiveTimeout(options.handshakeTimeout)
        switch identify(connection, id: id, address: address, refusal: refusal) {
        case .source(let hello, let version, let security)?:
            logger.info("source authenticated", metadata: ["peer": "\(socket.peer)", "host": "\(hello.host)", "security": "\(security.summary)"])
            let session = DestinationSession(control: connection, version: version, store: store, server: self, logger: logger,
                                             security: security, sourceHost: hello.host)
            lock.withLock { sessions[session.session] = session }
            session.run()
            socket.close()
        case .channel(let frame)?:
            bind(frame, connection, address: address)
        case .rejoin(let frame)?:
            rejoin(frame, connection, address: address)
        case nil:
            break
        }
    }

    /// What a new connection turned out to be.
    private enum Arrival {
        /// A source that completed the handshake, and the protocol version chosen.
        case source(HelloMessage, UInt16, SessionSecurity)
        /// A data channel's `bind`, to check against its session.
        case channel(Frame)
        /// A session's control connection continuing here (`rejoin`), to check likewise.
        case rejoin(Frame)
    }

    /// Reads a new connection's first frame and, for a source, runs the handshake. Until
    /// this returns the connection counts as a handshake in progress (it may be shed); one
    /// that is refused is logged (at the tally's rate), answered and closed, and nil returned.
    private func identify(_ connection: FrameConnection, id: Int, address: String, refusal: String?) -> Arrival? {
        let wasShed = { [self] () -> Bool in
            lock.withLock {
                handshakes.remove(id: id)
                handshaking[id] = nil
                return shedHandshakes.remove(id) != nil
            }
        }
        let refuse = { [self] (code: ErrorCode, reason: String, reply: String) in
            guard !wasShed() else { return connection.close() }
            note(.refused, address, peer: connection.peer, reason: reason)
            connection.fail(code, reply)
            connection.close()
        }
        if let refusal {
            refuse(.protocolViolation, refusal, "refused: \(refusal)")
            return nil
        }
        let first: Frame
        do {
            first = try connection.receive()
        } catch {
            let message: String
            if let e = error as? SocketError, e.kind == .timedOut || e.kind == .system(EAGAIN) {
                message = "said nothing within \(Int(options.handshakeTimeout.seconds)) s"
            } else {
                message = "\(error)"
            }
            refuse(.protocolViolation, message, "refused: \(message)")
            return nil
        }
        switch first.type {
        case .hello:
            do {
                let (hello, version, security) = try HandshakeRunner.destination(connection, hello: first, keys: options.keys, host: HostInfo.hostname)
                guard !wasShed() else {
                    connection.close()
                    return nil
                }
                return .source(hello, version, security)
            } catch {
                let (code, message): (ErrorCode, String) = (error as? ErrorMessage).map { ($0.code, $0.message) } ?? (.authenticationFailed, "\(error)")
                refuse(code, message, message)
                return nil
            }
        case .bind:
            guard !wasShed() else {
                connection.close()
                return nil
            }
            return .channel(first)
        case .rejoin:
            guard !wasShed() else {
                connection.close()
                return nil
            }
            return .rejoin(first)
        default:
            refuse(.protocolViolation, "first frame was \(first.type)", "expected hello, bind or rejoin, got \(first.type)")
            return nil
        }
    }

    /// Refuses a connection that named a session (a `bind` or a `rejoin`): counted and
    /// logged at the tally's rate, answered, closed.
    /// `logAs` prefixes the reason in the log only.
    private func refuseJoin(_ connection: FrameConnection, address: String, _ code: ErrorCode, _ reason: String, data: Bool,
                            logAs prefix: String = "") {
        note(.refused, address, peer: connection.peer, reason: prefix + reason, data: data)
        connection.fail(code, reason)
        connection.close()
    }

    private func bind(_ frame: Frame, _ connection: FrameConnection, address: String) {
        let refuse = { [self] (code: ErrorCode, reason: String) in refuseJoin(connection, address: address, code, reason, data: true) }
        guard let message = try? ControlCoding.decode(BindMessage.self, from: frame) else {
            return refuse(.protocolViolation, "malformed bind")
        }
        guard message.version >= ProtocolVersion.oldestSupported && message.version <= ProtocolVersion.current else {
            return refuse(.unsupportedVersion, "protocol v\(message.version) is not supported")
        }
        guard let session = lock.withLock({ sessions[message.session] }) else {
            return refuse(.unknownSession, "no such session")
        }
        guard ChannelBinding.verify(proof: message.proof, bindKey: session.bindKey, session: message.session, channel: message.channel) else {
            return refuse(.authenticationFailed, "the channel's proof of the session key is wrong")
        }
        guard message.channel < FrameSeal.controlConnection - ControlRejoin.maximumGeneration else {
            return refuse(.protocolViolation, "channel number \(message.channel) is reserved for control connections")
        }
        guard session.claim(channel: message.channel) else {
            return refuse(.authenticationFailed, "channel \(message.channel) was bound before in this session (a replayed bind)")
        }
        do {
            try connection.send(.bound, BoundMessage(channel: message.channel,
                                                     proof: ChannelBinding.proof(bindKey: session.bindKey, session: message.session,
                                                                                 channel: message.channel, role: .bound)))
        } catch {
            return refuse(.aborted, "\(error)")
        }
        session.security.secureData(connection, channel: message.channel, as: .destination)
        connection.socket.setReceiveTimeout(nil)
        guard session.attach(channel: Int(message.channel), connection: connection) else {
            return refuse(.protocolViolation, "the session is not ready for data channels")
        }
    }

    /// A connection that says it continues a session's control connection: its proof is
    /// checked like a channel's bind, then the session's link moves to it.
    private func rejoin(_ frame: Frame, _ connection: FrameConnection, address: String) {
        let refuse = { [self] (code: ErrorCode, reason: String) in refuseJoin(connection, address: address, code, reason, data: false, logAs: "rejoin: ") }
        guard let message = try? ControlCoding.decode(RejoinMessage.self, from: frame) else {
            return refuse(.protocolViolation, "malformed rejoin")
        }
        guard message.version >= ProtocolVersion.movableControl && message.version <= ProtocolVersion.current else {
            return refuse(.unsupportedVersion, "protocol v\(message.version) cannot move a control connection")
        }
        guard let session = lock.withLock({ sessions[message.session] }) else {
            return refuse(.unknownSession, "no such session")
        }
        guard ControlRejoin.verify(proof: message.proof, bindKey: session.bindKey, session: message.session,
                                   generation: message.generation, received: message.received, role: .rejoin) else {
            return refuse(.authenticationFailed, "the rejoin's proof of the session key is wrong")
        }
        guard message.generation >= 1 && message.generation <= ControlRejoin.maximumGeneration else {
            return refuse(.protocolViolation, "control connection number \(message.generation) is out of range")
        }
        connection.socket.setReceiveTimeout(nil)
        do {
            try session.adoptControl(connection, message)
        } catch {
            refuse(.aborted, error.description)
        }
    }

    /// A new offer for `name` from the same source host while an earlier session for it
    /// waits, without a control connection, for its source to come back: that source has
    /// given up (the VM's lock lets one `ferry migrate` at a time move it, and this offer
    /// is another), unless the
    /// earlier session got as far as `prepared`, whose copy only its source's decision may
    /// discard. The earlier session is failed, discards its copy, and is waited for (10 s
    /// at most). Returns whether it went.
    func supersedeAbandoned(vm name: String, by newer: DestinationSession) -> Bool {
        let older = lock.withLock { incomingNames[name].flatMap { sessions[$0] } }
        guard let older, older !== newer, older.sourceHost == newer.sourceHost, let link = older.link, !link.isConnected,
              older.isBeforePrepared else { return false }
        logger.notice("a new offer for the VM supersedes a session whose source is gone",
                      metadata: ["vm": "\(name)", "session": "\(older.session)"])
        return end(older, of: name, link: link, "superseded: a new migration of the VM arrived while this one's source was away")
    }

    /// Fails `older`'s link with `reason` and waits until the session has let go of `name`
    /// (10 s at most); whether it did.
    private func end(_ older: DestinationSession, of name: String, link: ControlLink, _ reason: String) -> Bool {
        link.abandon(reason)
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            if lock.withLock({ incomingNames[name] != older.session }) { return true }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return false
    }

    /// A resume of a postcopy migration (``OfferMessage/resumeSession``) while the session
    /// it continues still waits here for its source (which crashed, and came back as this
    /// one): the older session is ended without touching the VM, which runs here. Its
    /// data path closes QEMU's sockets, so that QEMU pauses the migration and can take the
    /// new streams, and its monitor and lock are let go. Waited for (10 s at most);
    /// returns whether it went.
    @discardableResult
    func supersedePostcopy(vm name: String, by newer: DestinationSession) -> Bool {
        let older = lock.withLock { incomingNames[name].flatMap { sessions[$0] } }
        guard let older, older !== newer, older.inPostcopy.current, let link = older.link else { return older == nil }
        logger.notice("a resume of the postcopy migration supersedes the session it continues",
                      metadata: ["vm": "\(name)", "session": "\(older.session)"])
        return end(older, of: name, link: link, "superseded: the source resumed the migration in a new session")
    }

    /// Incoming migrations running and waiting now (`--max-migrations`), as `incoming.json` says.
    public var incoming: IncomingMigrations { admission.snapshot }

    func register(_ session: DestinationSession, name: String, memoryMiB: Int) throws {
        try lock.withLock {
            if let other = incomingNames[name], other != session.session {
                throw ErrorMessage(code: .vmExists, message: "VM '\(name)' is already being migrated to this host")
            }
            incomingNames[name] = session.session
            incomingMiB[name] = memoryMiB
        }
    }

    /// Guest memory of the VMs arriving now, MiB by name.
    var arrivingMiB: [String: Int] { lock.withLock { incomingMiB } }

    func unregister(_ session: DestinationSession) {
        lock.withLock {
            sessions[session.session] = nil
            transferring[session.session] = nil
            if let name = session.vmName, incomingNames[name] == session.session {
                incomingNames[name] = nil
                incomingMiB[name] = nil
            }
        }
        admission.remove(session: session.session)
        rebalance()
    }

    /// A session starts receiving: the host's bandwidth is shared anew.
    func startedTransfer(_ session: DestinationSession) {
        lock.withLock { transferring[session.session] = session }
        rebalance()
    }

    /// Gives every transferring session an equal share of `--max-bandwidth`.
    private func rebalance() {
        guard let max = options.maxBandwidthBytesPerSecond else { return }
        let active = lock.withLock { Array(transferring.values) }
        guard !active.isEmpty else { return }
        let share = max / UInt64(active.count)
        for session in active { session.sendLimit(share) }
    }

    /// This host's NICs as the destination offers them (interface discovery): those
    /// allowed, with only the addresses the daemon listens on.
    func offeredInterfaces() -> [InterfaceMessage] {
        let everywhere = options.addresses.contains { $0 == "0.0.0.0" || $0 == "::" }
        return InterfaceDiscovery.list(speeds: options.nicSpeeds)
            .filter { !$0.isLoopback && options.nics.allows($0.name) }
            .map(InterfaceMessage.init)
            .compactMap { nic in
                var nic = nic
                if !everywhere {
                    nic.addresses = nic.addresses.filter { options.addresses.contains(String($0.split(separator: "/")[0])) }
                }
                return nic.addresses.isEmpty ? nil : nic
            }
    }

    /// Where to listen when not told: every address of this host's migration NICs (those
    /// `nics` allows, not loopback, not link-local), never the wildcard.
    public static func defaultAddresses(nics: NICSelection, speeds: [String: UInt64]) -> [String] {
        InterfaceDiscovery.list(speeds: speeds)
            .filter { !$0.isLoopback && nics.allows($0.name) }
            .flatMap { $0.addresses.filter { !$0.isLinkLocal }.map(\.address) }
    }
}

extension MigrationServer {
    /// Listens on `host:port`, waiting up to 5 s while the address is in use: a daemon
    /// restarted right after it was killed can find its old listening socket still open
    /// for a moment, while the dead process's last threads exit.
    static func listen(host: String, port: UInt16, logger: Logger) throws(SocketError) -> Socket {
        let deadline = ContinuousClock.now + .seconds(5)
        var told = false
        while true {
            do {
                // A flood's connects arriving between two passes of the door must not fill
                // the accept queue: a full one drops SYNs, and a source's dropped SYN is
                // sent again only after 1 s.
                return try Socket.listenTCP(host: host, port: port, backlog: 4096)
            } catch {
                guard case .system(EADDRINUSE) = error.kind, port != 0, ContinuousClock.now < deadline else { throw error }
                if !told {
                    logger.notice("address in use; waiting up to 5 s for it", metadata: ["address": "\(host):\(port)"])
                    told = true
                }
                Thread.sleep(forTimeInterval: 0.2)
            }
        }
    }
}
