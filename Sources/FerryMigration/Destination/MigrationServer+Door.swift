import FerryIO
import FerryInterfaces
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation
import Logging

// The door of ``MigrationServer``: one thread that accepts on every listener and holds
// every connection until its first frame has arrived (docs/SECURITY.md, "Floods of
// connections").
extension MigrationServer {
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
    func door() -> Never {
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
    enum FirstFrame {
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
    func firstFrame(of socket: Socket, ended: Bool, buffer: inout [UInt8]) -> FirstFrame {
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
    func handOff(_ socket: Socket, id: Int, address: String, refusal: String?) {
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
    func note(_ kind: RefusalTally.Kind, _ address: String, peer: String? = nil, reason: String? = nil, data: Bool = false) {
        let detailed = lock.withLock { tally.note(kind, address: address, at: .now) }
        guard detailed, let peer, let reason else { return }
        logger.warning(data ? "refused data channel" : "refused connection", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
    }

    /// Logs what the tally held back, once per interval at most.
    func logSummary() {
        guard let summary = lock.withLock({ tally.summary(at: .now) }) else { return }
        logger.warning("refused or shed connections (not logged one by one)", metadata: [
            "shed": "\(summary.shed)", "silent": "\(summary.silent)", "refused": "\(summary.refused)",
            "addresses": "\(summary.addresses)", "busiest": "\(summary.busiest.map { "\($0.address) x\($0.count)" }.joined(separator: ", "))",
            "in": "\(String(format: "%.1f", summary.interval.seconds)) s",
        ])
    }
}
