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
        public init(addresses: [String], port: UInt16) {
            precondition(!addresses.isEmpty)
            self.addresses = addresses
            self.port = port
        }
    }

    public let options: Options
    public let port: UInt16
    private let store: VMStore
    private let logger: Logger
    private let listeners: [Socket]
    private let lock = Monitor()
    private var sessions: [String: DestinationSession] = [:]
    private var incomingNames: [String: String] = [:]
    /// Connections in their handshake (identified by the door's number): the line that
    /// sheds, their sockets, and those shed (whose thread then logs nothing of its own).
    private var handshakes: DoorLine
    private var handshaking: [Int: Socket] = [:]
    private var shedHandshakes: Set<Int> = []
    /// Refusals and sheds, for the log at a bounded rate.
    private var tally = RefusalTally()
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

    // MARK: The door

    /// The largest first frame a connection may send: a hello or a bind is well under
    /// 1 KiB; 16 KiB leaves room for long host names and later fields, and fits in the
    /// socket's default receive buffer, so the door can see it whole before it is read.
    static let firstFrameLimit = 16 << 10

    /// POLLRDHUP (the peer shut its writing side), which Glibc's Swift overlay leaves out.
    static let pollReadHangUp: Int16 = 0x2000

    /// One thread accepts on every listener and watches, with poll(2), every connection
    /// that has not yet sent its whole first frame: a silent or half-spoken connection
    /// costs a descriptor, never a thread. One whose first frame is all there (or whose
    /// first bytes are no frame) goes to a thread of its own for the handshake.
    /// Connections that wait too long, and those shed when the door is full, are closed
    /// here; every refusal and shed is logged through ``RefusalTally``.
    private func door() -> Never {
        var waiting: [Int: Socket] = [:]
        var line = DoorLine(capacity: waitingCapacity)
        var nextID = 0
        var peekBuffer = [UInt8](repeating: 0, count: FrameHeader.byteCount + Self.firstFrameLimit)
        while true {
            let entries = line.entries
            var fds = listeners.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
                + entries.map { pollfd(fd: waiting[$0.id]!.fd, events: Int16(POLLIN) | Self.pollReadHangUp, revents: 0) }
            // Wake for the next summary and the next connection's deadline.
            var wait = Duration.milliseconds(250)
            if let first = entries.first { wait = min(wait, max(.zero, first.since + options.firstFrameTimeout - .now)) }
            let ready = poll(&fds, nfds_t(fds.count), Int32(wait.milliseconds) + 1)
            if ready > 0 {
                for (index, entry) in entries.enumerated() where fds[listeners.count + index].revents != 0 {
                    let socket = waiting[entry.id]!
                    // The peer has shut its side (or the connection failed): no more is coming.
                    let ended = fds[listeners.count + index].revents & (Self.pollReadHangUp | Int16(POLLHUP) | Int16(POLLERR)) != 0
                    switch firstFrame(of: socket, ended: ended, buffer: &peekBuffer) {
                    case .incomplete:
                        continue
                    case .closed:
                        line.remove(id: entry.id)
                        waiting[entry.id] = nil
                        socket.close()
                        note(.silent, entry.address, peer: socket.peer, reason: "closed before its first frame")
                    case .ready(let refusal):
                        line.remove(id: entry.id)
                        waiting[entry.id] = nil
                        socket.setReceiveLowWater(1)
                        handOff(socket, id: entry.id, address: entry.address, refusal: refusal)
                    }
                }
                for (index, listener) in listeners.enumerated() where fds[index].revents != 0 {
                    // A burst at most per listener and pass, so that those waiting are read too.
                    for _ in 0..<256 {
                        let socket: Socket
                        do {
                            guard let accepted = try listener.accept(timeout: .zero) else { break }
                            socket = accepted
                        } catch {
                            // Out of descriptors: shed one waiting connection to make room.
                            if case .system(let code) = error.kind, code == EMFILE || code == ENFILE, let shed = line.shedOne() {
                                waiting.removeValue(forKey: shed.id)?.close()
                                note(.shed, shed.address)
                            } else {
                                logger.error("accept failed", metadata: ["error": "\(error)"])
                                usleep(100_000)
                            }
                            break
                        }
                        nextID += 1
                        let address = Self.address(of: socket.peer)
                        waiting[nextID] = socket
                        if let shed = line.admit(id: nextID, address: address, at: .now) {
                            waiting.removeValue(forKey: shed.id)?.close()
                            note(.shed, shed.address)
                        }
                    }
                }
            } else if ready < 0 && errno != EINTR {
                logger.error("poll failed", metadata: ["error": "\(errnoDescription(errno))"])
                usleep(100_000)
            }
            for entry in line.expire(before: .now - options.firstFrameTimeout) {
                if let socket = waiting.removeValue(forKey: entry.id) {
                    // Best effort: the door never blocks on a peer, and a closed socket's
                    // small error frame fits in its empty send buffer.
                    FrameConnection(socket: socket).fail(.protocolViolation, "refused: no hello or bind within \(Int(options.firstFrameTimeout.seconds)) s")
                    socket.close()
                    note(.silent, entry.address, peer: socket.peer, reason: "sent no whole first frame within \(Int(options.firstFrameTimeout.seconds)) s")
                }
            }
            logSummary()
        }
    }

    /// What a waiting connection has sent so far.
    private enum FirstFrame {
        /// Less than its first frame: wait (poll wakes when the rest is there).
        case incomplete
        /// End of stream (or an error) before a first frame.
        case closed
        /// A whole first frame, or all the peer will send (it shut its side), for the
        /// handshake's thread to read without waiting; or bytes that cannot be a first
        /// frame, with the reason the thread refuses them for.
        case ready(refusal: String?)
    }

    /// Looks at what `socket` has queued without consuming it. While incomplete, sets the
    /// socket's receive low-water mark to what is missing, so that poll does not wake for
    /// every byte a slow (or hostile) peer trickles in. `ended`: the peer has shut its
    /// side, so what is queued is all there will be (a truncated frame goes to its thread,
    /// whose read reports exactly how it ends).
    private func firstFrame(of socket: Socket, ended: Bool, buffer: inout [UInt8]) -> FirstFrame {
        let count = buffer.withUnsafeMutableBytes { socket.peek(into: $0) }
        guard let count else { return ended ? .closed : .incomplete }
        guard count > 0 else { return .closed }
        if ended { return .ready(refusal: nil) }
        // Not a Ferry frame (an HTTP probe, garbage): refused now, not at the deadline.
        let magic = withUnsafeBytes(of: FrameHeader.magic.bigEndian) { Array($0) }
        guard buffer.prefix(min(count, magic.count)).elementsEqual(magic.prefix(min(count, magic.count))) else {
            return .ready(refusal: "its first bytes are not a Ferry frame")
        }
        guard count >= FrameHeader.byteCount else {
            socket.setReceiveLowWater(FrameHeader.byteCount)
            return .incomplete
        }
        let header: FrameHeader
        do {
            header = try buffer.withUnsafeBytes { try FrameHeader.parse(UnsafeRawBufferPointer(rebasing: $0[..<FrameHeader.byteCount])) }
        } catch {
            return .ready(refusal: "its first frame's header is bad: \(error)")
        }
        guard header.length <= Self.firstFrameLimit else {
            return .ready(refusal: "its first frame (\(header.type)) announces \(header.length) bytes; hello and bind take at most \(Self.firstFrameLimit)")
        }
        let whole = FrameHeader.byteCount + Int(header.length)
        guard count >= whole else {
            socket.setReceiveLowWater(whole)
            return .incomplete
        }
        return .ready(refusal: nil)
    }

    /// Starts a connection's handshake on a thread of its own, shedding one in progress
    /// if `maxPendingConnections` are.
    private func handOff(_ socket: Socket, id: Int, address: String, refusal: String?) {
        let shed = lock.withLock { () -> (Socket, String)? in
            handshaking[id] = socket
            guard let shed = handshakes.admit(id: id, address: address, at: .now) else { return nil }
            shedHandshakes.insert(shed.id)
            return handshaking[shed.id].map { ($0, shed.address) }
        }
        if let (victim, victimAddress) = shed {
            // Its thread wakes with an error, logs nothing and closes it.
            victim.shutdown()
            note(.shed, victimAddress)
        }
        startThread("ferry-conn") { [self] in handle(socket, id: id, address: address, refusal: refusal) }
    }

    /// A peer's address without its port: "10.0.0.1" of "10.0.0.1:5000", "fe80::1" of "[fe80::1]:5000".
    static func address(of peer: String) -> String {
        if peer.hasPrefix("["), let close = peer.firstIndex(of: "]") { return String(peer[peer.index(after: peer.startIndex)..<close]) }
        guard let colon = peer.lastIndex(of: ":") else { return peer }
        return String(peer[..<colon])
    }

    /// Counts a refusal or shed; logs it on a line of its own if the tally's budget allows.
    private func note(_ kind: RefusalTally.Kind, _ address: String, peer: String? = nil, reason: String? = nil, data: Bool = false) {
        let detailed = lock.withLock { tally.note(kind, address: address, at: .now) }
        guard detailed, let peer, let reason else { return }
        logger.warning(data ? "refused data channel" : "refused connection", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
    }

    /// Logs what the tally held back, once per interval at most.
    private func logSummary() {
        guard let summary = lock.withLock({ tally.summary(at: .now) }) else { return }
        logger.warning("refused or shed connections (not logged one by one)", metadata: [
            "shed": "\(summary.shed)", "silent": "\(summary.silent)", "refused": "\(summary.refused)",
            "addresses": "\(summary.addresses)", "busiest": "\(summary.busiest.map { "\($0.address) x\($0.count)" }.joined(separator: ", "))",
            "in": "\(String(format: "%.1f", summary.interval.seconds)) s",
        ])
    }

    // MARK: Handshakes

    private func handle(_ socket: Socket, id: Int, address: String, refusal: String?) {
        // A source that vanishes (its NICs or host died) is noticed within seconds, not
        // after TCP's minutes of retransmissions.
        socket.setUserTimeout(.seconds(5))
        let connection = FrameConnection(socket: socket)
        socket.setReceiveTimeout(options.handshakeTimeout)
        switch identify(connection, id: id, address: address, refusal: refusal) {
        case .source(let hello, let security)?:
            logger.info("source authenticated", metadata: ["peer": "\(socket.peer)", "host": "\(hello.host)", "security": "\(security.summary)"])
            let session = DestinationSession(control: connection, store: store, server: self, logger: logger,
                                             security: security, sourceHost: hello.host)
            lock.withLock { sessions[session.session] = session }
            session.run()
            socket.close()
        case .channel(let frame)?:
            bind(frame, connection, address: address)
        case nil:
            break
        }
    }

    /// What a new connection turned out to be.
    private enum Arrival {
        /// A source that completed the handshake.
        case source(HelloMessage, SessionSecurity)
        /// A data channel's `bind`, to check against its session.
        case channel(Frame)
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
                let (hello, _, security) = try HandshakeRunner.destination(connection, hello: first, keys: options.keys, host: HostInfo.hostname)
                guard !wasShed() else {
                    connection.close()
                    return nil
                }
                return .source(hello, security)
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
        default:
            refuse(.protocolViolation, "first frame was \(first.type)", "expected hello or bind, got \(first.type)")
            return nil
        }
    }

    private func bind(_ frame: Frame, _ connection: FrameConnection, address: String) {
        let refuse = { [self] (code: ErrorCode, reason: String) in
            note(.refused, address, peer: connection.peer, reason: reason, data: true)
            connection.fail(code, reason)
            connection.close()
        }
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

    func register(_ session: DestinationSession, name: String) throws {
        try lock.withLock {
            if let other = incomingNames[name], other != session.session {
                throw ErrorMessage(code: .vmExists, message: "VM '\(name)' is already being migrated to this host")
            }
            incomingNames[name] = session.session
        }
    }

    func unregister(_ session: DestinationSession) {
        lock.withLock {
            sessions[session.session] = nil
            transferring[session.session] = nil
            if let name = session.vmName, incomingNames[name] == session.session { incomingNames[name] = nil }
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

/// Connections not yet identified, in arrival order, at most `capacity`: who is shed when
/// one more arrives. The victim is the oldest connection of the address holding the most.
/// sshd's MaxStartups drops new connections at random past a threshold; that still lets
/// a flood from one address crowd out a source that tries once. Shedding by address
/// instead means a flood must come from more addresses than the line has places before a
/// source's one connection is at risk, and even then it goes only if every flooding
/// address holds as few as it; the oldest goes first because a genuine peer speaks at
/// once, so an old silent connection is the least likely to be one.
/// A value: no clock, no sockets (the server does the I/O). Tested in SecurityTests.
struct DoorLine: Sendable {
    struct Entry: Sendable, Equatable {
        var id: Int
        var address: String
        var since: ContinuousClock.Instant
    }

    let capacity: Int
    private(set) var entries: [Entry] = []
    private var countByAddress: [String: Int] = [:]

    init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
    }

    var count: Int { entries.count }

    /// Adds a connection; if the line was full, removes and returns the one shed for it.
    mutating func admit(id: Int, address: String, at now: ContinuousClock.Instant) -> Entry? {
        let shed = entries.count >= capacity ? shedOne() : nil
        entries.append(Entry(id: id, address: address, since: now))
        countByAddress[address, default: 0] += 1
        return shed
    }

    /// Removes and returns the oldest connection of the address holding the most (of
    /// those, the address whose oldest is oldest).
    mutating func shedOne() -> Entry? {
        guard let most = countByAddress.values.max() else { return nil }
        guard let index = entries.firstIndex(where: { countByAddress[$0.address] == most }) else { return nil }
        return take(at: index)
    }

    @discardableResult
    mutating func remove(id: Int) -> Entry? {
        entries.firstIndex { $0.id == id }.map { take(at: $0) }
    }

    /// Removes and returns those that arrived before `deadline`.
    mutating func expire(before deadline: ContinuousClock.Instant) -> [Entry] {
        var expired: [Entry] = []
        while let first = entries.first, first.since < deadline { expired.append(take(at: 0)) }
        return expired
    }

    private mutating func take(at index: Int) -> Entry {
        let entry = entries.remove(at: index)
        let left = countByAddress[entry.address, default: 1] - 1
        countByAddress[entry.address] = left > 0 ? left : nil
        return entry
    }
}

/// Refusals and sheds, for a log that a flood cannot fill: in each interval (1 s) the
/// first `detailedPerInterval` refusals get a line of their own (peer and reason, so
/// that one misconfigured source is diagnosed from its line), sheds never do; the rest
/// are counted and summed up in one line per interval at most, with the busiest
/// addresses. A value: no clock (the caller passes the time), no logger.
struct RefusalTally: Sendable {
    enum Kind: Sendable {
        /// Closed to make room for a newer connection.
        case shed
        /// Sent no whole first frame in time, or closed before it.
        case silent
        /// Said something that was refused: garbage, a wrong key, a bind to nothing.
        case refused
    }

    struct Summary: Sendable, Equatable {
        var shed = 0
        var silent = 0
        var refused = 0
        var addresses = 0
        /// At most three, the most first.
        var busiest: [(address: String, count: Int)] = []
        var interval: Duration = .zero

        static func == (a: Summary, b: Summary) -> Bool {
            a.shed == b.shed && a.silent == b.silent && a.refused == b.refused && a.addresses == b.addresses
                && a.busiest.map(\.address) == b.busiest.map(\.address) && a.busiest.map(\.count) == b.busiest.map(\.count)
                && a.interval == b.interval
        }
    }

    var interval: Duration = .seconds(1)
    var detailedPerInterval = 5
    private var windowStart: ContinuousClock.Instant?
    private var detailed = 0
    private var held = Summary()
    private var byAddress: [String: Int] = [:]

    /// Counts one; true if it should be logged on a line of its own.
    mutating func note(_ kind: Kind, address: String, at now: ContinuousClock.Instant) -> Bool {
        if let start = windowStart, now - start >= interval, held.shed + held.silent + held.refused == 0 {
            windowStart = nil
        }
        if windowStart == nil {
            windowStart = now
            detailed = 0
        }
        if kind != .shed && detailed < detailedPerInterval {
            detailed += 1
            return true
        }
        switch kind {
        case .shed: held.shed += 1
        case .silent: held.silent += 1
        case .refused: held.refused += 1
        }
        byAddress[address, default: 0] += 1
        return false
    }

    /// What was held back, once its interval is over; nil before, or if nothing was.
    mutating func summary(at now: ContinuousClock.Instant) -> Summary? {
        guard let start = windowStart, now - start >= interval else { return nil }
        windowStart = nil
        guard held.shed + held.silent + held.refused > 0 else { return nil }
        var summary = held
        summary.addresses = byAddress.count
        summary.busiest = byAddress.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }.prefix(3).map { ($0.key, $0.value) }
        summary.interval = now - start
        held = Summary()
        byAddress = [:]
        return summary
    }
}
