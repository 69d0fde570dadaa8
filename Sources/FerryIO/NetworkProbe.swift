import Foundation

/// Watches a guest's network while it moves: what its users would see.
///
/// - **UDP:** a probe every `interval` to the guest's echo port, numbered and timed. A probe
///   whose echo never comes (within `lostAfter`) is lost; one that comes later than
///   `lateAfter` is late (it waited somewhere, a paused guest's queue). The outage is the
///   longest run of probes lost or late: from the first one's sending to the sending of
///   the next probe answered on time, which is how long the guest did not answer, to
///   within one interval. A probe that this process was too slow to send is not a probe
///   lost: only probes sent count, so a stall of the prober is never the guest's outage.
/// - **TCP:** one connection to the same port, carrying a numbered byte pattern at a modest
///   rate and reading it back. It must stay open and get back every byte, in order.
///
/// The guest side is the demo guest's `ferry-netecho` (any echo service, RFC 862, serves).
public final class NetworkProbe: @unchecked Sendable {
    public struct Options: Sendable {
        public var host: String
        public var port: UInt16 = 7
        public var interval: Duration = .milliseconds(10)
        public var lateAfter: Duration = .milliseconds(100)
        public var lostAfter: Duration = .seconds(1)
        /// Whether to keep a TCP connection too.
        public var tcp = true
        /// TCP bytes sent per interval.
        public var tcpChunk = 1024
        public init(host: String, port: UInt16 = 7) {
            self.host = host
            self.port = port
        }
    }

    /// What the probe saw. Milliseconds and counts; `Codable` for reports and files.
    public struct Result: Codable, Sendable, Equatable {
        public var sent = 0
        public var answered = 0
        public var lost = 0
        public var late = 0
        /// The longest time the guest did not answer (see the type's comment).
        public var outageMilliseconds = 0.0
        /// When that outage began, seconds since the epoch (nil: none).
        public var outageStartedAt: Double?
        /// Round trips of the answered probes.
        public var medianRoundTripMilliseconds = 0.0
        public var maxRoundTripMilliseconds = 0.0
        public var intervalMilliseconds = 10.0
        /// TCP: whether the connection was made, and how it ended.
        public var tcpConnected = false
        /// Why the TCP connection broke (reset, closed, a byte out of place); nil: it held.
        public var tcpBroken: String?
        public var tcpBytesSent: UInt64 = 0
        public var tcpBytesEchoed: UInt64 = 0
        /// The longest time TCP bytes were owed and none came back.
        public var tcpLongestStallMilliseconds = 0.0

        public init() {}

        /// "lost 12 probes (120 ms of outage), 1 late of 1500; TCP held, 1.4 MiB echoed".
        public var summary: String {
            var text = "lost \(lost) probe\(lost == 1 ? "" : "s") (\(Int(outageMilliseconds.rounded())) ms of outage), \(late) late of \(sent)"
            if tcpConnected {
                let b = Double(tcpBytesEchoed)
                let bytes = b >= 1_048_576 ? String(format: "%.1f MiB", b / 1048576) : String(format: "%.0f KiB", b / 1024)
                text += tcpBroken.map { "; TCP broken: \($0)" } ?? "; TCP held (\(bytes) echoed, longest stall \(Int(tcpLongestStallMilliseconds.rounded())) ms)"
            } else if tcpBroken != nil {
                text += "; TCP never connected: \(tcpBroken!)"
            }
            return text
        }
    }

    public let options: Options
    private let lock = NSLock()
    private var running = true
    private var sentAt: [Double] = []        // by sequence number, monotonic seconds
    private var answeredAt: [Double?] = []   // round trip end, monotonic seconds
    private var tcp = Result()
    private let finished = DispatchGroup()
    private let wallStart = Date().timeIntervalSince1970
    private let monoStart = NetworkProbe.now()

    /// Starts probing at once (two threads). Fails if the address is not IPv4 or no UDP
    /// socket can be made.
    public init(_ options: Options) throws {
        self.options = options
        var address = sockaddr_in()
        guard inet_pton(AF_INET, options.host, &address.sin_addr) == 1 else {
            throw SocketError("probe", peer: options.host, kind: .badAddress)
        }
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = options.port.bigEndian
        let udp = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard udp >= 0 else { throw SocketError.errno("probe socket", peer: options.host) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(udp, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else {
            let code = errno
            close(udp)
            throw SocketError("probe connect", peer: options.host, kind: .system(code))
        }
        finished.enter()
        Thread.detachNewThread { [self] in
            udpLoop(udp)
            close(udp)
            finished.leave()
        }
        if options.tcp {
            finished.enter()
            Thread.detachNewThread { [self] in
                tcpLoop()
                finished.leave()
            }
        }
    }

    /// Waits until a probe sent from now on is answered: the guest is reachable again.
    /// False if none is within `timeout`.
    public func waitForAnswer(timeout: Duration) -> Bool {
        let from = Self.now(), deadline = from + timeout.seconds
        while Self.now() < deadline {
            let answered = lock.withLock { () -> Bool in
                var i = sentAt.count - 1
                while i >= 0 && sentAt[i] >= from {
                    if answeredAt[i] != nil { return true }
                    i -= 1
                }
                return false
            }
            if answered { return true }
            Thread.sleep(forTimeInterval: 0.01)
        }
        return false
    }

    /// Stops probing (after waiting up to `lostAfter` for the last echoes) and gives the result.
    public func stop() -> Result {
        Thread.sleep(forTimeInterval: min(0.3, options.lostAfter.seconds))
        lock.withLock { running = false }
        finished.wait()
        return result()
    }

    /// The result so far.
    public func result() -> Result {
        lock.withLock {
            var r = tcp
            r.intervalMilliseconds = options.interval.seconds * 1000
            let now = Self.now()
            // Only probes old enough to have been answered count.
            let settled = sentAt.indices.filter { answeredAt[$0] != nil || now - sentAt[$0] >= options.lostAfter.seconds || !running }
            r.sent = settled.count
            var trips: [Double] = []
            var runStart: Int?   // the first probe of the current run lost or late
            for i in settled {
                var onTime = false
                if let answered = answeredAt[i] {
                    let trip = answered - sentAt[i]
                    trips.append(trip)
                    if trip > options.lateAfter.seconds { r.late += 1 } else { onTime = true }
                }
                if !onTime {
                    if runStart == nil { runStart = i }
                } else if let first = runStart {
                    let outage = sentAt[i] - sentAt[first]
                    if outage * 1000 > r.outageMilliseconds {
                        r.outageMilliseconds = outage * 1000
                        r.outageStartedAt = wallStart + (sentAt[first] - monoStart)
                    }
                    runStart = nil
                }
            }
            r.answered = trips.count
            r.lost = r.sent - r.answered
            trips.sort()
            if !trips.isEmpty {
                r.medianRoundTripMilliseconds = trips[trips.count / 2] * 1000
                r.maxRoundTripMilliseconds = trips[trips.count - 1] * 1000
            }
            return r
        }
    }

    private var isRunning: Bool { lock.withLock { running } }

    private static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    private func udpLoop(_ fd: Int32) {
        var next = Self.now()
        var packet = [UInt8](repeating: 0, count: 16)
        var reply = [UInt8](repeating: 0, count: 64)
        while isRunning {
            let now = Self.now()
            if now >= next {
                let seq = lock.withLock { () -> UInt64 in
                    sentAt.append(now)
                    answeredAt.append(nil)
                    return UInt64(sentAt.count - 1)
                }
                withUnsafeBytes(of: seq.littleEndian) { packet.replaceSubrange(0..<8, with: $0) }
                withUnsafeBytes(of: UInt64(0x4645_5252_5950_5242).littleEndian) { packet.replaceSubrange(8..<16, with: $0) }
                _ = packet.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                next += options.interval.seconds
                if next < now { next = now + options.interval.seconds }  // never a burst after a stall
            }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let wait = max(0, Int32(((next - Self.now()) * 1000).rounded(.up)))
            if poll(&p, 1, min(wait, 50)) > 0 { takeEchoes(fd, into: &reply) }
        }
        // The last echoes.
        let until = Self.now() + min(0.3, options.lostAfter.seconds)
        while Self.now() < until {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 20) > 0 { takeEchoes(fd, into: &reply) }
        }
    }

    /// Notes the answer time of every echo waiting on `fd` (the first answer of a probe counts).
    private func takeEchoes(_ fd: Int32, into reply: inout [UInt8]) {
        while true {
            let n = reply.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            guard n >= 16 else { return }
            let at = Self.now()
            let seq = reply.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
            lock.withLock {
                if seq < UInt64(sentAt.count), answeredAt[Int(seq)] == nil { answeredAt[Int(seq)] = at }
            }
        }
    }

    /// Why the TCP connection did not hold.
    private struct Broken: Error { let why: String }

    /// Waits up to `wait` ms for echoed bytes and checks each against the pattern at its
    /// offset; the bytes taken (0: none yet).
    private func receiveEchoes(_ fd: Int32, into input: inout [UInt8], echoed: inout UInt64, wait: Int32) throws(Broken) -> Int {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        _ = poll(&p, 1, wait)
        let n = input.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        if n == 0 { throw Broken(why: "the guest closed the connection after \(echoed) bytes") }
        if n < 0 {
            if errno != EAGAIN && errno != EINTR { throw Broken(why: "recv: \(errnoDescription(errno))") }
            return 0
        }
        for k in 0..<n where input[k] != Self.patternByte(echoed + UInt64(k)) {
            throw Broken(why: "byte \(echoed + UInt64(k)) came back wrong")
        }
        echoed += UInt64(n)
        return n
    }

    /// The pattern's byte at stream offset `i`.
    @inline(__always) private static func patternByte(_ i: UInt64) -> UInt8 { UInt8(truncatingIfNeeded: (i &* 131) ^ (i >> 8)) }

    private func tcpLoop() {
        let socket: Socket
        do {
            socket = try Socket.connectTCP(host: options.host, port: options.port, timeout: .seconds(5))
        } catch {
            lock.withLock { tcp.tcpBroken = "\(error)" }
            return
        }
        defer { socket.close() }
        socket.setNoDelay()
        lock.withLock { tcp.tcpConnected = true }
        let fd = socket.fd
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var sent: UInt64 = 0, echoed: UInt64 = 0
        var lastProgress = Self.now()
        var nextSend = Self.now()
        var out = [UInt8](repeating: 0, count: options.tcpChunk)
        var input = [UInt8](repeating: 0, count: 65536)
        func fail(_ why: String) { lock.withLock { tcp.tcpBroken = why } }
        while isRunning {
            let now = Self.now()
            // Send the next chunk on time, unless a lot is owed (the guest is away).
            if now >= nextSend && sent - echoed < 256 * 1024 {
                for k in 0..<out.count { out[k] = Self.patternByte(sent + UInt64(k)) }
                let n = out.withUnsafeBytes { Foundation.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if n > 0 {
                    if sent == echoed { lastProgress = now }
                    sent += UInt64(n)
                } else if n < 0 && errno != EAGAIN && errno != EINTR {
                    return fail("send: \(errnoDescription(errno))")
                }
                nextSend += options.interval.seconds
                if nextSend < now { nextSend = now + options.interval.seconds }
            }
            let n: Int
            do { n = try receiveEchoes(fd, into: &input, echoed: &echoed, wait: 10) } catch { return fail(error.why) }
            let at = Self.now()
            if n > 0 { lastProgress = at }
            let stall = sent > echoed ? at - lastProgress : 0
            lock.withLock {
                tcp.tcpBytesSent = sent
                tcp.tcpBytesEchoed = echoed
                tcp.tcpLongestStallMilliseconds = max(tcp.tcpLongestStallMilliseconds, stall * 1000)
            }
        }
        // What is still owed comes back, or the connection did not hold.
        let until = Self.now() + 2
        while echoed < sent && Self.now() < until {
            do { _ = try receiveEchoes(fd, into: &input, echoed: &echoed, wait: 20) } catch { return fail(error.why) }
        }
        lock.withLock {
            tcp.tcpBytesEchoed = echoed
            if echoed < sent { tcp.tcpBroken = "\(sent - echoed) bytes never came back" }
        }
    }
}

/// Whether a string is a dotted-quad IPv4 address.
public enum IPv4Check {
    public static func isAddress(_ text: String) -> Bool {
        var address = in_addr()
        return inet_pton(AF_INET, text, &address) == 1
    }
}
