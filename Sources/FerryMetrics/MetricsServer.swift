import FerryIO
import Foundation

/// The `/metrics` responder: HTTP/1.1 on Ferry's blocking sockets, one request per
/// connection (`Connection: close`), no framework. One thread accepts; each connection
/// gets a thread of its own, at most ``Limits/connections`` at once (more are closed at
/// once), so a slow or hostile client holds one thread for one ``Limits/requestTimeout``
/// at most and never the others: the whole request head must arrive within that time and
/// within ``Limits/requestByteCount``, or the client gets 408 or 431 and is closed.
// `stopped` and `active` are under `lock`; the rest is immutable.
public final class MetricsServer: @unchecked Sendable {
    public struct Limits: Sendable {
        /// A scraper sends its whole request in one segment at once; 5 s is a lost
        /// segment resent twice with room to spare.
        public var requestTimeout: Duration = .seconds(5)
        /// Prometheus sends ~250 bytes of head; 8 KiB is what common servers allow.
        public var requestByteCount = 8 * 1024
        /// Connections served at once: scrapers are one or two per host.
        public var connections = 8
        /// Writing the answer (a few tens of KiB) must not take longer than this.
        public var sendTimeout: Duration = .seconds(10)
        public init() {}
    }

    public let address: MetricsAddress
    /// The port listened on (the one asked for, or the one picked for port 0).
    public let port: UInt16
    public let limits: Limits
    private let listener: Socket
    private let exposition: @Sendable () -> String
    private let lock = Monitor()
    private var stopped = false
    private var active = 0
    private let done = DispatchSemaphore(value: 0)

    /// Listens on `address` and starts serving; `exposition` is called for every GET /metrics.
    public init(address: MetricsAddress, limits: Limits = Limits(), exposition: @escaping @Sendable () -> String) throws(SocketError) {
        self.address = address
        self.limits = limits
        self.exposition = exposition
        listener = try Socket.listenTCP(host: address.host, port: address.port, backlog: 64)
        port = listener.localPort
        startThread("ferry-metrics") { [self] in acceptLoop() }
    }

    /// Connections being served now.
    public var activeConnections: Int { lock.withLock { active } }

    private func acceptLoop() {
        defer { done.signal() }
        while !lock.withLock({ stopped }) {
            guard let client = try? listener.accept(timeout: .milliseconds(200)) else { continue }
            let admitted = lock.withLock { () -> Bool in
                guard active < limits.connections else { return false }
                active += 1
                return true
            }
            guard admitted else {
                client.close()
                continue
            }
            startThread("ferry-metrics-c", stackSize: 256 << 10) { [self] in
                serve(client)
                lock.withLock { active -= 1 }
            }
        }
    }

    /// Reads one request head within the limits, answers, closes.
    func serve(_ client: Socket) {
        defer { client.close() }
        client.setSendTimeout(limits.sendTimeout)
        let deadline = ContinuousClock.now + limits.requestTimeout
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 2048)
        var response: HTTPResponse
        reading: while true {
            switch HTTPRequestHead.parse(received) {
            case .complete(let head):
                response = HTTPResponse.answer(head, metrics: exposition)
                break reading
            case .malformed:
                response = HTTPResponse(status: 400, reason: "Bad Request", body: "not an HTTP/1 request\n")
                break reading
            case .incomplete:
                break
            }
            if received.count >= limits.requestByteCount {
                response = HTTPResponse(status: 431, reason: "Request Header Fields Too Large", body: "request larger than \(limits.requestByteCount) bytes\n")
                break
            }
            let left = deadline - .now
            // The deadline is for the whole head: a client trickling a byte at a time gains nothing.
            guard left > .zero, client.waitReadable(timeout: left) else {
                response = HTTPResponse(status: 408, reason: "Request Timeout", body: "no whole request within \(limits.requestTimeout)\n")
                break
            }
            let want = min(buffer.count, limits.requestByteCount - received.count)
            let n = (try? buffer.withUnsafeMutableBytes { try client.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<want])) }) ?? 0
            guard n > 0 else { return }  // the client left (or broke): nothing to answer
            received += buffer[0..<n]
        }
        try? client.writeAll(response.bytes)
        client.shutdownWrite()
        // Closing with request bytes unread would reset the connection, and the reset can
        // discard the answer before the client reads it (a refused oversized request):
        // read what is still coming, for a moment and a bounded amount, until the client closes.
        let drainUntil = ContinuousClock.now + .seconds(1)
        var drained = 0
        while drained < 256 * 1024, case let left = drainUntil - .now, left > .zero, client.waitReadable(timeout: left) {
            let n = (try? buffer.withUnsafeMutableBytes { try client.read(into: $0) }) ?? 0
            guard n > 0 else { return }
            drained += n
        }
    }

    /// Stops accepting, waits for the accept thread, closes the listener. Connections
    /// being served finish on their own (within their timeouts).
    public func stop() {
        let first = lock.withLock { () -> Bool in
            defer { stopped = true }
            return !stopped
        }
        guard first else { return }
        done.wait()
        listener.close()
    }
}
