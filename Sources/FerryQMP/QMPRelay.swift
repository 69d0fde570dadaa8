import FerryIO
import Foundation

/// Keeps one QMP connection to a QEMU open, negotiated with out-of-band commands, and lends
/// it to one client at a time on a socket of its own, so that the connection outlives the
/// process that uses it.
///
/// Why: in postcopy the destination QEMU's main thread can block behind a vCPU that faults
/// on a page not yet there while holding QEMU's big lock (seen under TCG). The pages then
/// come only once the migration is resumed, and resuming takes `migrate-recover`, which
/// QEMU runs out of band, in its monitor's own thread, on a connection that negotiated
/// `oob` before. A new connection cannot negotiate then (`qmp_capabilities` runs on the
/// main thread). So the destination's `ferry serve` talks to a postcopy QEMU through this
/// relay, a process of its own: a crash of `ferry serve` leaves the negotiated connection
/// open, and its successor resumes through it.
///
/// To each client the relay is a QMP monitor: the greeting QEMU sent (with `oob`), its own
/// answer to `qmp_capabilities`, and the rest forwarded both ways. Command ids are rewritten
/// on the way up and back, so that an answer owed to a client that left (a command blocked
/// behind the main thread) never reaches the next one. A new client takes the connection
/// from the one before. The relay ends when QEMU closes the connection (it exited), or once
/// QEMU's migration ended and no client holds it: QEMU's monitor is then free for direct use.
public final class QMPRelay: @unchecked Sendable {
    private let upstream: Socket
    private let listener: Socket
    private let greeting: [UInt8]
    private let lock = Monitor()
    // Under `lock`:
    private var client: Socket?
    private var generation = 0
    private var nextID = 0
    private var owed: [String: (generation: Int, id: JSONValue?)] = [:]
    private var migrationEnded = false
    private var finished = false
    private let done: Monitor.Condition

    /// Connects to QEMU's monitor at `qemuSocket`, negotiates `oob`, and listens at
    /// `listenPath` (mode 0600).
    public init(qemuSocket: String, listenPath: String, timeout: Duration = .seconds(10)) throws {
        done = lock.makeCondition()
        upstream = try Socket.connectUnix(path: qemuSocket)
        upstream.setReceiveTimeout(timeout)
        var reader = LineReader(socket: upstream)
        guard let greet = try reader.next(), (try? JSONValue.parse(greet))?["QMP"] != nil else {
            throw QMPError(socket: qemuSocket, command: nil, kind: .protocolError("no QMP greeting"))
        }
        greeting = greet + [UInt8(ascii: "\n")]
        let caps = #"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"relay-caps"}"# + "\n"
        try upstream.writeAll(Array(caps.utf8))
        while true {
            guard let line = try reader.next() else { throw QMPError(socket: qemuSocket, command: "qmp_capabilities", kind: .closed) }
            guard let value = try? JSONValue.parse(line), value["id"]?.string == "relay-caps" else { continue }
            if let error = value["error"] {
                throw QMPError(socket: qemuSocket, command: "qmp_capabilities",
                               kind: .command(errorClass: error["class"]?.string ?? "GenericError", description: error["desc"]?.string ?? "\(error)"))
            }
            break
        }
        upstream.setReceiveTimeout(nil)
        leftover = reader.buffer
        listener = try Socket.listenUnix(path: listenPath)
        chmod(listenPath, 0o600)
    }

    private var leftover: [UInt8] = []

    /// Serves clients until the relay ends (see the type's notes).
    public func run() {
        let up = Thread { [self] in upstreamLoop() }
        up.name = "qmp-relay-up"
        up.start()
        let accepting = Thread { [self] in acceptLoop() }
        accepting.name = "qmp-relay-accept"
        accepting.start()
        lock.withLock {
            while !finished { done.wait() }
        }
        listener.shutdown()
        upstream.shutdown()
    }

    private func finish() {
        lock.withLock {
            finished = true
            done.broadcast()
        }
    }

    private func acceptLoop() {
        while true {
            guard let socket = try? listener.accept() else { return }
            let (mine, old) = lock.withLock { () -> (Int, Socket?) in
                generation += 1
                let old = client
                client = socket
                return (generation, old)
            }
            old?.shutdown()  // the newest client takes the connection
            try? socket.writeAll(greeting)
            let reading = Thread { [self] in clientLoop(socket, generation: mine) }
            reading.name = "qmp-relay-client"
            reading.start()
        }
    }

    private func clientLoop(_ socket: Socket, generation mine: Int) {
        var reader = LineReader(socket: socket)
        while let line = try? reader.next() {
            guard case .object(var request)? = try? JSONValue.parse(line) else { continue }
            if request["execute"]?.string == "qmp_capabilities" {
                // Negotiated once, upstream: the client is told it is done.
                var answer: [String: JSONValue] = ["return": .object([:])]
                if let id = request["id"] { answer["id"] = id }
                try? socket.writeAll(Array((JSONValue.object(answer).description + "\n").utf8))
                continue
            }
            let relayID = lock.withLock { () -> String in
                nextID += 1
                let key = "relay-\(nextID)"
                owed[key] = (mine, request["id"])
                return key
            }
            request["id"] = .string(relayID)
            let out = Array((JSONValue.object(request).description + "\n").utf8)
            let sent = lock.withLock { (try? upstream.writeAll(out)) != nil }
            if !sent { break }
        }
        socket.shutdown()
        let end = lock.withLock { () -> Bool in
            guard generation == mine else { return false }
            client = nil
            return migrationEnded
        }
        if end { finish() }
    }

    private func upstreamLoop() {
        var reader = LineReader(socket: upstream, buffer: leftover)
        while let line = try? reader.next() {
            guard case .object(var message)? = try? JSONValue.parse(line) else { continue }
            var target: Socket?
            if let key = message["id"]?.string, key.hasPrefix("relay-") {
                let (owner, current, holder) = lock.withLock { (owed.removeValue(forKey: key), generation, client) }
                // An answer owed to a client that left goes nowhere.
                guard let owner, owner.generation == current, let holder else { continue }
                message["id"] = owner.id
                target = holder
            }
            if message["event"] != nil {
                if message["event"]?.string == "MIGRATION",
                   let status = message["data"]?["status"]?.string, ["completed", "failed", "cancelled"].contains(status) {
                    let alone = lock.withLock { () -> Bool in
                        migrationEnded = true
                        return client == nil
                    }
                    if alone { finish() }
                }
                target = lock.withLock { client }
            }
            guard let target else { continue }
            try? target.writeAll(Array((JSONValue.object(message).description + "\n").utf8))
        }
        finish()  // QEMU closed its monitor: it exited
    }
}

/// Lines (without their newline) from a socket; a line longer than ``maximumLength`` ends
/// the reading as the socket's end does.
struct LineReader {
    static let maximumLength = 16 << 20
    let socket: Socket
    var buffer: [UInt8] = []
    private var scratch = [UInt8](repeating: 0, count: 65536)

    init(socket: Socket, buffer: [UInt8] = []) {
        self.socket = socket
        self.buffer = buffer
    }

    /// The next line; nil at the socket's end (or a line over the limit).
    mutating func next() throws -> [UInt8]? {
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                return line
            }
            if buffer.count > Self.maximumLength { return nil }
            let n = try scratch.withUnsafeMutableBytes { try socket.read(into: $0) }
            if n <= 0 { return nil }
            buffer.append(contentsOf: scratch[..<n])
        }
    }
}
