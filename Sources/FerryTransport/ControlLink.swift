import FerryIO
import FerryWire
import Foundation

/// A session's control connection that outlives the TCP connection it started on
/// (protocol v2; docs/PROTOCOL.md, "The control connection moves").
///
/// Every control frame either side sends after `accept` is numbered by its place in that
/// direction (implicitly: TCP keeps the order, so no number travels) and kept until the
/// peer says it has it (`received`, sent after every 2 MiB or 32 frames and as the
/// connection's heartbeat every 500 ms). When the connection breaks (an error, its NIC
/// losing carrier, or no TCP acknowledgement for the stall timeout while bytes are
/// outstanding), the source opens a new one, over another NIC pair if it can, and proves
/// it belongs to the session with `rejoin`; the destination answers `rejoined`. Each side
/// names how many frames it has received, and each sends again, in order, the frames the
/// other lacks. Nothing is lost, nothing is delivered twice. The destination waits for
/// the source to come back; the link fails only when no connection could be made for
/// `rejoinTimeout`.
///
/// With a peer of protocol v1 (`movable` false) the link is the plain connection: nothing
/// is numbered or kept, and the first break fails it.
///
/// Threads: any thread may send; one takes frames with ``receive(timeout:)`` (the
/// migration's, or a pump thread posting to its event queue). The link reads on its
/// "ferry-ctl-rx" thread and keeps the connection (heartbeats, stalls, rejoining) on
/// "ferry-ctl-keep". `sendLock` orders numbered sends and replays; every `var` is under
/// `lock`.
public final class ControlLink: @unchecked Sendable {
    public enum Role: Sendable { case source, destination }

    public struct Options: Sendable {
        /// Protocol v2 on both sides: the connection may move.
        public var movable: Bool
        /// How long the link may go without a connection before it fails.
        public var rejoinTimeout: Duration = .seconds(10)
        /// No TCP acknowledgement for this long while bytes are outstanding: the
        /// connection is dead (as for data channels, ``StallWatch``).
        public var stallTimeout: Duration = .milliseconds(1000)
        /// A `received` goes out when nothing else has for this long.
        public var heartbeat: Duration = .milliseconds(500)
        /// Nothing at all from the peer for this long (its heartbeats included): the
        /// connection is dead even if TCP still acknowledges (a peer that stopped reading it).
        public var silenceTimeout: Duration = .seconds(5)
        /// The local NIC of the current path still has carrier (the source's check; nil:
        /// not checked).
        public var carrier: (@Sendable (String) -> Bool)?
        public init(movable: Bool) { self.movable = movable }
    }

    /// A new connection the source made for the link: sealed, its `rejoined` checked.
    public struct Rejoined {
        public var connection: FrameConnection
        /// Frames the destination said it has received from us.
        public var peerReceived: UInt64
        /// The source's NIC it leaves by (nil: unknown), and a description for the report.
        public var interface: String?
        public var path: String
        public init(connection: FrameConnection, peerReceived: UInt64, interface: String?, path: String) {
            self.connection = connection
            self.peerReceived = peerReceived
            self.interface = interface
            self.path = path
        }
    }

    /// The source's way back: make a connection for `generation` over the path of try
    /// number `attempt` (the link counts tries within an outage), telling the destination
    /// we have received `received` frames. Runs on the keeper thread.
    public typealias Rejoiner = @Sendable (_ generation: UInt32, _ received: UInt64, _ attempt: Int, _ avoid: String?) throws -> Rejoined

    public enum Failure: Error, CustomStringConvertible, Equatable {
        /// The connection broke and could not be replaced (the reason says why).
        case lost(String)
        /// ``close()`` was called.
        case closed

        public var description: String {
            switch self {
            case .lost(let why): return why
            case .closed: return "the control connection was closed"
            }
        }
    }

    public let role: Role
    public let options: Options
    /// How long the link may go without a connection before it fails: `options.rejoinTimeout`
    /// until ``waitForever()`` (under `lock`).
    private var rejoinLimit: Duration?
    private let rejoiner: Rejoiner?
    private let note: @Sendable (String) -> Void
    private let sendLock = Monitor()
    private let lock = Monitor()
    private let changed: Monitor.Condition

    private var current: FrameConnection?
    private var interface: String?
    private var path: String
    /// The highest generation used or seen (each connection takes a new one).
    private var generation: UInt32 = 0
    /// Every connection the link ever used, closed when the link's threads are done.
    private var connections: [FrameConnection] = []
    private var sentCount: UInt64 = 0
    /// Sent and not yet confirmed by the peer, oldest first: frame `retainedBase + i`.
    private var retained: [Frame] = []
    private var retainedBase: UInt64 = 0
    private var retainedBytes = 0
    private var receivedCount: UInt64 = 0
    private var receivedAtLastAck: UInt64 = 0
    private var bytesSinceAck = 0
    private var lastSend = ContinuousClock.now
    private var lastReceive = ContinuousClock.now
    private var inbox: [Frame] = []
    /// While there is no connection: since when, why, and over which NIC it was lost.
    private var lost: (since: ContinuousClock.Instant, reason: String, interface: String?, path: String)?
    private var attempts = 0
    private var lastAttemptError = ""
    private var failure: String?
    private var closed = false
    private var wakeups = 0
    private var threadsRunning = 0
    /// Connections this link has moved to, for the report.
    public private(set) var moves = 0

    /// Frames above this size in retention make senders wait for the peer to catch up
    /// (boot files on a connection being replaced); control messages never wait.
    static let retentionLimit = 8 << 20
    static let ackEveryBytes = 2 << 20
    static let ackEveryFrames: UInt64 = 32

    /// A link over `connection`, whose handshake is done (sealed if the session is). The
    /// first frame numbered is the next one each side sends. `path` describes the
    /// connection for the report; `interface` is the source's NIC under it.
    public init(_ connection: FrameConnection, role: Role, options: Options, interface: String? = nil, path: String,
                rejoiner: Rejoiner? = nil, note: @escaping @Sendable (String) -> Void = { _ in }) {
        precondition(role == .destination || !options.movable || rejoiner != nil, "a movable source link needs a way to rejoin")
        self.role = role
        self.options = options
        self.rejoinLimit = options.rejoinTimeout
        self.rejoiner = rejoiner
        self.note = note
        self.interface = interface
        self.path = path
        changed = lock.makeCondition()
        connection.socket.setReceiveTimeout(nil)
        current = connection
        connections = [connection]
        threadsRunning = options.movable ? 2 : 1
        startThread("ferry-ctl-rx") { [self] in read() }
        if options.movable { startThread("ferry-ctl-keep") { [self] in keep() } }
    }

    /// False while the link has no connection (waiting to be rejoined, or rejoining).
    public var isConnected: Bool { lock.withLock { current != nil } }

    /// Fails the link now (a newer session for the same VM supersedes this one).
    public func abandon(_ reason: String) { failLink(reason) }

    /// The current connection's peer, or where it was lost.
    public var peer: String { lock.withLock { current?.peer ?? path } }
    public var currentPath: String { lock.withLock { path } }

    // MARK: Sending

    /// Sends a control frame. On a movable link a broken connection does not fail the
    /// send: the frame is kept and goes out on the next connection. Throws once the link
    /// has failed or was closed.
    public func send(_ frame: Frame) throws(Failure) {
        if options.movable {
            // Only a big backlog waits (boot file pieces while the connection is replaced).
            lock.withLock {
                while retainedBytes > Self.retentionLimit && current == nil && failure == nil && !closed { changed.wait() }
            }
        }
        sendLock.lock()
        defer { sendLock.unlock() }
        let connection = try lock.withLock { () -> Result<FrameConnection?, Failure> in
            if let failure { return .failure(.lost(failure)) }
            if closed { return .failure(.closed) }
            if options.movable {
                retained.append(frame)
                retainedBytes += frame.payload.count
                sentCount += 1
            }
            lastSend = .now
            return .success(current)
        }.get()
        guard let connection else { return }  // kept; the next connection carries it
        do {
            try connection.send(frame)
        } catch {
            broke(connection, "\(error)")
            if !options.movable { throw .lost("\(error)") }
        }
    }

    public func send<T: Encodable>(_ type: FrameType, _ message: T) throws(Failure) {
        try send(ControlCoding.frame(type, message))
    }

    /// Sends an `error` and closes the link (best effort).
    public func fail(_ code: ErrorCode, _ message: String) {
        try? send(.error, ErrorMessage(code: code, message: message))
        if let connection = lock.withLock({ current }) { connection.socket.shutdownWrite() }
    }

    // MARK: Receiving

    /// The next frame from the peer, in order; nil after `timeout` (nil: wait for ever) or
    /// when ``wake()`` is called. Throws once the link failed or closed and every frame
    /// that arrived before has been taken.
    public func receive(timeout: Duration?) throws(Failure) -> Frame? {
        try lock.withLock { () -> Result<Frame?, Failure> in
            let deadline = timeout.map { ContinuousClock.now + $0 }
            let wakeupsAtStart = wakeups
            while true {
                if !inbox.isEmpty { return .success(inbox.removeFirst()) }
                if let failure { return .failure(.lost(failure)) }
                if closed { return .failure(.closed) }
                if wakeups != wakeupsAtStart { return .success(nil) }
                if let deadline {
                    if !changed.wait(until: deadline) && inbox.isEmpty && failure == nil && !closed { return .success(nil) }
                } else {
                    changed.wait()
                }
            }
        }.get()
    }

    /// Like ``receive(timeout:)``, with an `error` from the peer thrown as ``ErrorMessage``.
    public func receiveChecked(timeout: Duration?) throws -> Frame? {
        guard let frame = try receive(timeout: timeout) else { return nil }
        if frame.type == .error {
            throw (try? ControlCoding.decode(ErrorMessage.self, from: frame))
                ?? ErrorMessage(code: .protocolViolation, message: "peer sent an unreadable error frame")
        }
        return frame
    }

    /// Makes every ``receive(timeout:)`` waiting now return nil (a stop was requested).
    public func wake() {
        lock.withLock {
            wakeups += 1
            changed.broadcast()
        }
    }

    /// Reads the link's frames on a thread of its own from now on: each to `frame`, then
    /// once the reason the link ended to `lost`.
    public func startPump(_ name: String, frame: @escaping @Sendable (Frame) -> Void, lost: @escaping @Sendable (String) -> Void) {
        startThread(name) { [self] in
            while true {
                do {
                    if let f = try receive(timeout: nil) { frame(f) }
                } catch {
                    lost("\(error)")
                    return
                }
            }
        }
    }

    /// Waits up to `timeout` for the peer to confirm every frame sent so far, while there
    /// is a connection (a link being mended is not waited for).
    public func drain(timeout: Duration) {
        guard options.movable else { return }
        lock.withLock {
            let deadline = ContinuousClock.now + timeout
            while !retained.isEmpty && current != nil && failure == nil && !closed {
                if !changed.wait(until: deadline) { return }
            }
        }
    }

    // MARK: Ending

    /// Ends the link: its connection is shut, its threads stop, and once they have, every
    /// connection it used is closed.
    public func close() {
        let connections = lock.withLock { () -> [FrameConnection] in
            closed = true
            changed.broadcast()
            return self.connections
        }
        for c in connections { c.shutdown() }
        let done = lock.withLock { () -> Bool in
            let deadline = ContinuousClock.now + .seconds(5)
            while threadsRunning > 0 { if !changed.wait(until: deadline) { break } }
            return threadsRunning == 0
        }
        // A thread still inside a call (a rejoin's connect) would see its descriptor reused.
        if done { for c in connections { c.close() } }
    }

    private func threadDone() {
        lock.withLock {
            threadsRunning -= 1
            changed.broadcast()
        }
    }

    // MARK: The reader

    private func read() {
        defer { threadDone() }
        while true {
            let next = lock.withLock { () -> FrameConnection?? in
                while current == nil && failure == nil && !closed { changed.wait() }
                return failure == nil && !closed ? .some(current) : .none
            }
            guard let connection = next ?? nil else { return }
            let frame: Frame
            do {
                frame = try connection.receive()
            } catch {
                broke(connection, Self.describe(error))
                continue
            }
            lock.withLock { if current === connection { lastReceive = .now } }
            if options.movable && frame.type == .received {
                guard let message = try? ControlCoding.decode(ReceivedMessage.self, from: frame) else {
                    failLink("the peer sent a malformed received frame")
                    return
                }
                guard confirm(message.received) else {
                    failLink("the peer confirmed \(message.received) control frames; \(lock.withLock { sentCount }) were sent")
                    return
                }
                continue
            }
            let ack = lock.withLock { () -> UInt64? in
                // A frame read from a connection already given up is sent again on the next.
                guard current === connection else { return nil }
                inbox.append(frame)
                changed.broadcast()
                guard options.movable else { return nil }
                receivedCount += 1
                bytesSinceAck += frame.payload.count
                guard bytesSinceAck >= Self.ackEveryBytes || receivedCount - receivedAtLastAck >= Self.ackEveryFrames else { return nil }
                return noteAck()
            }
            if let ack { sendReceived(ack, on: connection) }
        }
    }

    /// Under `lock`: the count a `received` about to go out carries.
    private func noteAck() -> UInt64 {
        receivedAtLastAck = receivedCount
        bytesSinceAck = 0
        return receivedCount
    }

    /// The peer has `count` of our frames: those need not be kept. False if it claims
    /// more than were sent. Fewer than it confirmed before is old news, not an error: the
    /// peer's reader took that count before a move, and the rejoin's own count (newer)
    /// overtook it (seen once in `ControlLinkTests`, 160 after 200, under load).
    private func confirm(_ count: UInt64) -> Bool {
        lock.withLock {
            guard count <= sentCount else { return false }
            guard count > retainedBase else { return true }
            let drop = Int(count - retainedBase)
            retainedBytes -= retained.prefix(drop).reduce(0) { $0 + $1.payload.count }
            retained.removeFirst(drop)
            retainedBase = count
            changed.broadcast()
            return true
        }
    }

    private func sendReceived(_ count: UInt64, on connection: FrameConnection) {
        do {
            try connection.send(.received, ReceivedMessage(received: count))
            lock.withLock { lastSend = .now }
        } catch {
            broke(connection, Self.describe(error))
        }
    }

    // MARK: Breaking and mending

    /// `connection` failed: it is given up (if it is still the current one). A movable
    /// link then rejoins (the source) or waits to be rejoined (the destination).
    private func broke(_ connection: FrameConnection, _ reason: String) {
        let gaveUp = lock.withLock { () -> Bool in
            guard current === connection, !closed, failure == nil else { return false }
            current = nil
            lost = (.now, reason, interface, path)
            attempts = 0
            changed.broadcast()
            return true
        }
        guard gaveUp else { return }
        connection.shutdown()
        if !options.movable { failLink(reason) }
    }

    private func failLink(_ reason: String) {
        let connection = lock.withLock { () -> FrameConnection? in
            if failure == nil && !closed { failure = reason }
            changed.broadcast()
            defer { current = nil }
            return current
        }
        connection?.shutdown()
    }

    /// From now on the link never gives up on a lost connection: the source keeps trying
    /// to rejoin and the destination keeps waiting (postcopy, where the VM needs both hosts
    /// and ending the session would leave its QEMUs paused).
    public func waitForever() {
        lock.withLock {
            rejoinLimit = nil
            changed.broadcast()
        }
    }

    /// The keeper: heartbeats and stall checks while connected; rejoining (source) or
    /// waiting to be rejoined (destination) while not; the link's failure when that takes
    /// longer than `rejoinTimeout`.
    private func keep() {
        defer { threadDone() }
        var stalls = StallWatch(limitMilliseconds: UInt32(options.stallTimeout.milliseconds))
        let started = ContinuousClock.now
        while true {
            let (connection, lostState, ending, limit) = lock.withLock { () -> (FrameConnection?, (since: ContinuousClock.Instant, reason: String, interface: String?, path: String)?, Bool, Duration?) in
                _ = changed.wait(timeout: .milliseconds(100))
                return (current, lost, closed || failure != nil, rejoinLimit)
            }
            if ending { return }
            if let connection {
                tend(connection, &stalls, now: (ContinuousClock.now - started).seconds)
            } else if let lostState {
                if let limit, ContinuousClock.now - lostState.since > limit {
                    let last = lock.withLock { lastAttemptError }
                    failLink("the connection over \(lostState.path) failed (\(lostState.reason)) and "
                             + (role == .source ? "no new one reached the destination" : "the source did not come back")
                             + " within \(Int(options.rejoinTimeout.seconds)) s" + (last.isEmpty ? "" : " (last try: \(last))"))
                    return
                }
                if role == .source { rejoinOnce(lostState) }
            }
        }
    }

    /// One look at a live connection: a heartbeat if one is due, then its health.
    private func tend(_ connection: FrameConnection, _ stalls: inout StallWatch, now: Double) {
        let ack = lock.withLock { () -> UInt64? in
            let idle = ContinuousClock.now - lastSend >= options.heartbeat
            let owed = receivedCount > receivedAtLastAck && ContinuousClock.now - lastSend >= .milliseconds(100)
            return idle || owed ? noteAck() : nil
        }
        if let ack { sendReceived(ack, on: connection) }
        if let nic = lock.withLock({ interface }), let carrier = options.carrier, !carrier(nic) {
            broke(connection, "\(nic) lost carrier")
            return
        }
        let silent = lock.withLock { ContinuousClock.now - lastReceive }
        if silent > options.silenceTimeout {
            broke(connection, String(format: "nothing from the peer for %.1f s", silent.seconds))
            return
        }
        if let progress = connection.socket.tcpProgress(),
           let age = stalls.check(channel: 0, unackedSegments: progress.unackedSegments,
                                  millisecondsSinceLastAck: progress.millisecondsSinceLastAck, now: now) {
            stalls.forget(channel: 0)
            broke(connection, "no TCP acknowledgement for \(age) ms")
        }
    }

    /// The source's try at a new connection; on success the link runs on it.
    private func rejoinOnce(_ lostState: (since: ContinuousClock.Instant, reason: String, interface: String?, path: String)) {
        guard let rejoiner else { return }
        let (nextGeneration, received, attempt) = lock.withLock { () -> (UInt32?, UInt64, Int) in
            guard generation < ControlRejoin.maximumGeneration else { return (nil, 0, 0) }
            generation += 1
            attempts += 1
            return (generation, receivedCount, attempts - 1)
        }
        guard let nextGeneration else {
            failLink("the control connection moved \(ControlRejoin.maximumGeneration) times; giving up")
            return
        }
        do {
            let made = try rejoiner(nextGeneration, received, attempt, lostState.interface)
            lock.withLock { connections.append(made.connection) }
            if !install(made.connection, generation: nextGeneration, peerReceived: made.peerReceived,
                        interface: made.interface, path: made.path) {
                made.connection.shutdown()
            }
        } catch {
            // The destination answered, and no other try would fare better.
            if let said = error as? ErrorMessage, [.unknownSession, .authenticationFailed, .unsupportedVersion, .aborted].contains(said.code) {
                failLink("the connection over \(lostState.path) failed (\(lostState.reason)) and the destination refused to continue the session: \(said.message)")
                return
            }
            lock.withLock { lastAttemptError = Self.describe(error) }
            // Tries rotate over the paths; a full round of failures waits a little.
            Thread.sleep(forTimeInterval: 0.05)
        }
    }

    /// The destination: a connection that proved (``RejoinMessage``, checked by the
    /// caller) it continues this link. Answers `rejoined` with `proof`, seals it with
    /// `secure`, sends again what the source lacks, and reads from it from now on. Throws
    /// (and the caller refuses the connection) if the link cannot take it.
    public func adopt(_ connection: FrameConnection, rejoin: RejoinMessage,
                      answer: (_ received: UInt64) -> RejoinedMessage, secure: (FrameConnection) -> Void) throws(Failure) {
        guard options.movable else { throw .lost("this session's control connection cannot move (protocol v1)") }
        let old = try lock.withLock { () -> Result<FrameConnection?, Failure> in
            if let failure { return .failure(.lost(failure)) }
            if closed { return .failure(.closed) }
            guard rejoin.generation > generation else {
                return .failure(.lost("rejoin as connection \(rejoin.generation), but \(generation) was used already (a replayed rejoin)"))
            }
            generation = rejoin.generation
            connections.append(connection)
            let old = current
            if old != nil {
                current = nil
                lost = (.now, "the source moved it", interface, path)
            }
            return .success(old)
        }.get()
        old?.shutdown()  // frees a sender blocked on it, and the reader
        let received = lock.withLock { receivedCount }
        do {
            try connection.send(.rejoined, answer(received))
        } catch {
            throw .lost("cannot answer the rejoin: \(error)")
        }
        secure(connection)
        guard install(connection, generation: rejoin.generation, peerReceived: rejoin.received, interface: nil,
                      path: "\(connection.peer) (\(rejoin.interface))") else {
            throw .lost("the rejoined connection failed at once")
        }
    }

    /// Puts `connection` under the link: the frames the peer lacks go out again, in order,
    /// before any new one; then the reader takes it. False if it failed meanwhile.
    private func install(_ connection: FrameConnection, generation: UInt32, peerReceived: UInt64,
                         interface: String?, path: String) -> Bool {
        sendLock.lock()
        defer { sendLock.unlock() }
        guard confirm(peerReceived) else {
            failLink("the peer says it received \(peerReceived) control frames; \(lock.withLock { sentCount }) were sent")
            return false
        }
        let replay = lock.withLock { retained }
        connection.socket.setReceiveTimeout(nil)
        do {
            for frame in replay { try connection.send(frame) }
        } catch {
            lock.withLock { lastAttemptError = "\(path): \(Self.describe(error))" }
            return false
        }
        let text = lock.withLock { () -> String? in
            // Closed, failed, or a later connection is being made (only the newest counts).
            guard !closed && failure == nil && self.generation == generation else { return nil }
            let was = lost
            current = connection
            self.interface = interface
            self.path = path
            lost = nil
            lastSend = .now
            lastReceive = .now
            moves += 1
            changed.broadcast()
            return was.map { was in
                String(format: "control connection over %@ lost (%@); continued over %@ after %.1f s, %d frame(s) sent again",
                       was.path, was.reason, path, (ContinuousClock.now - was.since).seconds, replay.count)
            }
        }
        guard let text else {
            connection.shutdown()
            return false
        }
        note(text)
        return true
    }

    static func describe(_ error: any Error) -> String {
        if let e = error as? SocketError, e.kind == .closed { return "closed by the peer" }
        return "\(error)"
    }
}
