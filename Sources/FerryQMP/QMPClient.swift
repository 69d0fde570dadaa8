import FerryIO
import Foundation
import Logging

/// A failure talking to QEMU over QMP. Says which socket and which command.
public struct QMPError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// Could not connect, or the greeting was not QMP.
        case connect(String)
        /// QEMU answered the command with an error (QMP's `class` and `desc`).
        case command(errorClass: String, description: String)
        /// No answer within the timeout.
        case timeout
        /// The connection closed (QEMU exited) before the answer came.
        case closed
        /// QEMU sent something that is not QMP.
        case protocolError(String)
    }
    public var socket: String
    public var command: String?
    public var kind: Kind

    public var description: String {
        let cmd = command.map { " '\($0)'" } ?? ""
        switch kind {
        case .connect(let why): return "QMP \(socket): cannot connect: \(why)"
        case .command(let cls, let desc): return "QEMU refused\(cmd): \(desc) (\(cls))"
        case .timeout: return "QMP\(cmd) on \(socket): no answer in time"
        case .closed: return "QMP\(cmd) on \(socket): QEMU closed the connection (exited?)"
        case .protocolError(let why): return "QMP \(socket): \(why)"
        }
    }
}

/// An asynchronous QMP event, with QEMU's timestamp.
public struct QMPEvent: Sendable, Equatable {
    public var name: String
    public var data: JSONValue
    /// Seconds since the epoch, as QEMU stamped it.
    public var timestamp: Double
}

/// A client for QEMU's machine protocol over a Unix socket.
///
/// Commands are synchronous (`execute` waits for the matching reply, with a timeout);
/// events are queued and read with `nextEvent` or observed with `eventHandler`.
/// A reader thread owns the socket's read side; any thread may call `execute`.
// `replies`, `events`, `greeting`, `closed` and `nextID` are under `monitor`, writes under
// `writeLock`; `readSide` is the reader's; `qemuVersion` is set in init, before anyone shares it.
public final class QMPClient: @unchecked Sendable {
    public let path: String
    /// QEMU's version from the greeting, e.g. "7.2.15".
    public private(set) var qemuVersion = ""

    private let socket: Socket
    /// What the reader thread shares with the callers. A caller of `execute` (and init, for
    /// the greeting) waits on `answered`, one of `nextEvent` on `eventQueued`.
    private let monitor = Monitor()
    private let answered: Monitor.Condition
    private let eventQueued: Monitor.Condition
    private var replies: [Int: JSONValue] = [:]
    private var events: [QMPEvent] = []
    private var greeting: JSONValue?
    private var closed = false
    private var nextID = 1
    /// Serialises commands on the socket (a write may block; the state stays free meanwhile).
    private let writeLock = Monitor()
    private let handler = Locked<(@Sendable (QMPEvent) -> Void)?>(nil)
    /// The reader thread: the only one that parses what QEMU sends.
    private var readSide = ThreadOwner()
    private let logger: Logger

    /// Called on the reader thread for every event (in addition to queueing it).
    public var eventHandler: (@Sendable (QMPEvent) -> Void)? {
        get { handler.current }
        set { handler.withLock { $0 = newValue } }
    }

    /// Connects, reads the greeting and enters command mode.
    /// `outOfBand`: negotiates QEMU's `oob` capability where QEMU offers it, so that
    /// ``execute(_:arguments:passing:timeout:outOfBand:)`` can run a command QEMU allows out
    /// of band (`migrate-recover`, `migrate-pause`) in its monitor's thread, while its main
    /// thread is blocked.
    public init(path: String, timeout: Duration = .seconds(10), outOfBand: Bool = false,
                logger: Logger = Logger(label: "ferry.qmp")) throws(QMPError) {
        self.path = path
        self.logger = logger
        answered = monitor.makeCondition()
        eventQueued = monitor.makeCondition()
        do {
            socket = try Socket.connectUnix(path: path)
        } catch {
            throw QMPError(socket: path, command: nil, kind: .connect(error.description))
        }
        let reader = Thread { [self] in readLoop() }
        reader.name = "qmp-reader"
        reader.start()

        monitor.lock()
        let deadline = ContinuousClock.now + timeout
        while greeting == nil && !closed {
            if !answered.wait(until: deadline) { break }
        }
        let greet = greeting
        monitor.unlock()
        guard let greet else {
            socket.shutdown()
            throw QMPError(socket: path, command: nil, kind: closed ? .closed : .timeout)
        }
        guard let qmp = greet["QMP"] else {
            socket.shutdown()
            throw QMPError(socket: path, command: nil, kind: .protocolError("greeting is not QMP: \(greet)"))
        }
        if let v = qmp["version"]?["qemu"] {
            qemuVersion = "\(v["major"]?.int ?? 0).\(v["minor"]?.int ?? 0).\(v["micro"]?.int ?? 0)"
        }
        let offered = qmp["capabilities"]?.array?.contains { $0.string == "oob" } ?? false
        if outOfBand && offered {
            _ = try execute("qmp_capabilities", arguments: .object(["enable": .array([.string("oob")])]), timeout: timeout)
            outOfBandEnabled = true
        } else {
            _ = try execute("qmp_capabilities", timeout: timeout)
        }
    }

    /// Out-of-band commands were negotiated (``init(path:timeout:outOfBand:logger:)``).
    public private(set) var outOfBandEnabled = false

    deinit {
        socket.shutdown()
    }

    /// Runs a command and returns its `return` value. `passing`: a descriptor sent along
    /// with the command (SCM_RIGHTS), for `getfd` and `add-fd`.
    @discardableResult
    /// `outOfBand`: sent as `exec-oob` if the connection negotiated it (QEMU runs it at once
    /// in its monitor's thread); else as usual.
    public func execute(_ command: String, arguments: JSONValue? = nil, passing descriptor: Int32? = nil,
                        timeout: Duration = .seconds(10), outOfBand: Bool = false) throws(QMPError) -> JSONValue {
        monitor.lock()
        let id = nextID
        nextID += 1
        let isClosed = closed
        monitor.unlock()
        if isClosed { throw QMPError(socket: path, command: command, kind: .closed) }

        var request: [String: JSONValue] = [outOfBand && outOfBandEnabled ? "exec-oob" : "execute": .string(command), "id": .number(Double(id))]
        if let arguments { request["arguments"] = arguments }
        var line = Array(JSONValue.object(request).description.utf8)
        line.append(UInt8(ascii: "\n"))
        logger.trace("qmp send", metadata: ["command": "\(command)"])
        do {
            try writeLock.withLock {
                if let descriptor { try socket.write(line, passing: descriptor) } else { try socket.writeAll(line) }
            }
        } catch {
            throw QMPError(socket: path, command: command, kind: .closed)
        }

        monitor.lock()
        defer { monitor.unlock() }
        let deadline = ContinuousClock.now + timeout
        while replies[id] == nil && !closed {
            if !answered.wait(until: deadline) { break }
        }
        guard let reply = replies.removeValue(forKey: id) else {
            throw QMPError(socket: path, command: command, kind: closed ? .closed : .timeout)
        }
        if let error = reply["error"] {
            throw QMPError(socket: path, command: command,
                           kind: .command(errorClass: error["class"]?.string ?? "GenericError",
                                          description: error["desc"]?.string ?? "\(error)"))
        }
        return reply["return"] ?? .null
    }

    /// The next queued event (optionally only those named in `names`), waiting up to `timeout`.
    public func nextEvent(named names: Set<String>? = nil, timeout: Duration) -> QMPEvent? {
        monitor.lock()
        defer { monitor.unlock() }
        let deadline = ContinuousClock.now + timeout
        while true {
            if let index = events.firstIndex(where: { names == nil || names!.contains($0.name) }) {
                return events.remove(at: index)
            }
            if closed { return nil }
            if !eventQueued.wait(until: deadline) { return nil }
        }
    }

    /// Events received so far and not yet taken.
    public func drainEvents() -> [QMPEvent] {
        monitor.withLock {
            let out = events
            events.removeAll()
            return out
        }
    }

    /// True once QEMU has closed the connection.
    public var isClosed: Bool { monitor.withLock { closed } }

    public func close() {
        socket.shutdown()
    }

    // MARK: Reader

    private func readLoop() {
        var reader = LineReader(socket: socket)
        while let line = try? reader.next() {
            if line.allSatisfy({ $0 == 32 || $0 == 13 }) { continue }
            handle(line: line)
        }
        if reader.buffer.count > LineReader.maximumLength {
            logger.error("QMP line longer than 16 MiB; closing", metadata: ["socket": "\(path)"])
        }
        monitor.withLock {
            closed = true
            answered.broadcast()
            eventQueued.broadcast()
        }
        socket.close()
    }

    private func handle(line: [UInt8]) {
        readSide.check("QMPClient's read side")
        guard let value = try? JSONValue.parse(line) else {
            logger.warning("QMP sent a line that is not JSON", metadata: ["socket": "\(path)"])
            return
        }
        if let name = value["event"]?.string {
            let ts = value["timestamp"]
            let stamp = Double(ts?["seconds"]?.int ?? 0) + Double(ts?["microseconds"]?.int ?? 0) / 1e6
            let event = QMPEvent(name: name, data: value["data"] ?? .null, timestamp: stamp)
            monitor.withLock {
                events.append(event)
                if events.count > 10_000 { events.removeFirst(events.count - 10_000) }
                eventQueued.broadcast()
            }
            eventHandler?(event)
            return
        }
        monitor.withLock {
            if value["QMP"] != nil {
                greeting = value
            } else if let id = value["id"]?.int {
                replies[id] = value
            } else if value["error"] != nil, greeting != nil, replies.isEmpty {
                // An error without id answers a request QEMU could not parse; nothing waits on it.
            }
            answered.broadcast()
        }
    }
}
