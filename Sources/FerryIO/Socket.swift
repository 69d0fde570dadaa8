#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CFerryLinux
import Foundation

/// A failed socket operation: what was being done, with whom, and the errno.
public struct SocketError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        case system(Int32)
        case closed
        case timedOut
        case badAddress
    }
    public var operation: String
    public var peer: String
    public var kind: Kind

    public init(_ operation: String, peer: String, kind: Kind) {
        self.operation = operation
        self.peer = peer
        self.kind = kind
    }

    static func errno(_ operation: String, peer: String, _ code: Int32 = Glibc.errno) -> SocketError {
        SocketError(operation, peer: peer, kind: .system(code))
    }

    public var description: String {
        let what: String
        switch kind {
        case .system(let code): what = errnoDescription(code)
        case .closed: what = "connection closed by peer"
        case .timedOut: what = "timed out"
        case .badAddress: what = "not a valid address"
        }
        return "\(operation) \(peer): \(what)"
    }

    /// True for errors that mean the connection is gone (as opposed to a local misuse).
    public var isDisconnect: Bool {
        switch kind {
        case .closed, .timedOut: return true
        case .system(let code): return [ECONNRESET, EPIPE, ECONNREFUSED, ENOTCONN, ETIMEDOUT, EHOSTUNREACH, ENETUNREACH, ENETDOWN, ECONNABORTED].contains(code)
        case .badAddress: return false
        }
    }
}

/// A blocking stream socket (TCP or Unix). One thread reads, one thread writes; `shutdown()`
/// from any thread wakes both, `close()` releases the descriptor exactly once.
// `fd` and `peer` are immutable; `closed` is under `closeLock`; the kernel orders the
// reader's and the writer's calls on `fd`.
public final class Socket: @unchecked Sendable {
    public let fd: Int32
    public let peer: String
    private let closeLock = Monitor()
    private var closed = false

    public init(fd: Int32, peer: String) {
        self.fd = fd
        self.peer = peer
    }

    deinit { close() }

    // MARK: Connecting

    /// Connects over TCP to `host:port` (IPv4 or IPv6 literal, or a name), within `timeout`.
    /// `device` binds the socket to one interface (SO_BINDTODEVICE), `source` to a local address.
    public static func connectTCP(host: String, port: UInt16, timeout: Duration = .seconds(5),
                                  device: String? = nil, source: String? = nil) throws(SocketError) -> Socket {
        let peer = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        let addresses = try resolve(host: host, port: port, peer: peer)
        var lastError = SocketError("connect to", peer: peer, kind: .badAddress)
        for address in addresses {
            let fd = Glibc.socket(Int32(address.family), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw .errno("socket for", peer: peer) }
            let socket = Socket(fd: fd, peer: peer)
            do {
                if let device {
                    let rc = device.withCString { setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, $0, socklen_t(strlen($0) + 1)) }
                    if rc != 0 { throw SocketError.errno("bind to device \(device) for", peer: peer) }
                }
                if let source {
                    let local = try resolve(host: source, port: 0, peer: peer).first(where: { $0.family == address.family })
                    guard local != nil else { throw SocketError("bind \(source) for", peer: peer, kind: .badAddress) }
                    let rc = local!.withSockaddr { Glibc.bind(fd, $0, $1) }
                    if rc != 0 { throw SocketError.errno("bind \(source) for", peer: peer) }
                }
                try socket.connect(address, timeout: timeout)
                socket.setNoDelay()
                return socket
            } catch let error as SocketError {
                lastError = error
            } catch {
                lastError = SocketError("connect to", peer: peer, kind: .badAddress)
            }
        }
        throw lastError
    }

    /// Connects to a Unix stream socket.
    public static func connectUnix(path: String) throws(SocketError) -> Socket {
        try unixSocket(path, operation: "connect to", Glibc.connect)
    }

    /// A Unix stream socket on which `call` (connect or bind) was made with `path`.
    private static func unixSocket(_ path: String, operation: String,
                                   _ call: (Int32, UnsafePointer<sockaddr>, socklen_t) -> Int32) throws(SocketError) -> Socket {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .errno("socket for", peer: path) }
        let socket = Socket(fd: fd, peer: path)
        var addr = try unixAddress(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { call(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw .errno(operation, peer: path) }
        return socket
    }

    private func connect(_ address: ResolvedAddress, timeout: Duration) throws(SocketError) {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
        let rc = address.withSockaddr { Glibc.connect(fd, $0, $1) }
        if rc != 0 {
            guard errno == EINPROGRESS else { throw .errno("connect to", peer: peer) }
            var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            let ready = poll(&pfd, 1, Int32(timeout.milliseconds))
            if ready == 0 { throw SocketError("connect to", peer: peer, kind: .timedOut) }
            if ready < 0 { throw .errno("connect to", peer: peer) }
            var soError: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len)
            if soError != 0 { throw .errno("connect to", peer: peer, soError) }
        }
        _ = fcntl(fd, F_SETFL, flags)
    }

    // MARK: Listening

    /// Listens on TCP `host:port` (port 0 picks a free one; see ``localPort``).
    public static func listenTCP(host: String, port: UInt16, backlog: Int32 = 64) throws(SocketError) -> Socket {
        let where_ = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        guard let address = try resolve(host: host, port: port, peer: where_).first else {
            throw SocketError("listen on", peer: where_, kind: .badAddress)
        }
        let fd = Glibc.socket(Int32(address.family), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .errno("socket for", peer: where_) }
        let socket = Socket(fd: fd, peer: where_)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        if address.family == AF_INET6 {
            var zero: Int32 = 0
            setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &zero, socklen_t(MemoryLayout<Int32>.size))
        }
        guard address.withSockaddr({ Glibc.bind(fd, $0, $1) }) == 0 else { throw .errno("bind", peer: where_) }
        guard Glibc.listen(fd, backlog) == 0 else { throw .errno("listen on", peer: where_) }
        return socket
    }

    /// Listens on a Unix stream socket at `path` (an old socket file there is replaced).
    public static func listenUnix(path: String, backlog: Int32 = 64) throws(SocketError) -> Socket {
        unlink(path)
        let socket = try unixSocket(path, operation: "bind", Glibc.bind)
        guard Glibc.listen(socket.fd, backlog) == 0 else { throw .errno("listen on", peer: path) }
        return socket
    }

    /// The local port of a TCP socket.
    public var localPort: UInt16 {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        let family = storage.ss_family
        return withUnsafePointer(to: &storage) { ptr -> UInt16 in
            if family == sa_family_t(AF_INET6) {
                return ptr.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            return ptr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
    }

    /// Waits up to `timeout` (nil: forever) for a connection. Returns nil on timeout.
    public func accept(timeout: Duration? = nil) throws(SocketError) -> Socket? {
        if let timeout {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(timeout.milliseconds))
            if ready == 0 { return nil }
            if ready < 0 {
                if errno == EINTR { return nil }
                throw .errno("accept on", peer: peer)
            }
        }
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let client = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { ferry_accept_cloexec(fd, $0, &len) }
        }
        guard client >= 0 else {
            if errno == EINTR || errno == EAGAIN || errno == ECONNABORTED { return nil }
            throw .errno("accept on", peer: peer)
        }
        let socket = Socket(fd: client, peer: Self.describe(&storage) ?? peer)
        if storage.ss_family != sa_family_t(AF_UNIX) { socket.setNoDelay() }
        return socket
    }

    // MARK: Reading and writing

    /// Reads what is available (blocking until at least one byte). Returns 0 at end of stream.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(SocketError) -> Int {
        while true {
            let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
            if n >= 0 { return n }
            if errno == EINTR { continue }
            if errno == EAGAIN { throw SocketError("read from", peer: peer, kind: .timedOut) }
            throw .errno("read from", peer: peer)
        }
    }

    /// Copies what is queued, up to `buffer.count`, without consuming it and without
    /// blocking: nil if nothing is queued yet, 0 at end of stream (or on an error, which
    /// the next read reports).
    public func peek(into buffer: UnsafeMutableRawBufferPointer) -> Int? {
        while true {
            let n = Glibc.recv(fd, buffer.baseAddress, buffer.count, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT))
            if n >= 0 { return n }
            if errno == EINTR { continue }
            return errno == EAGAIN ? nil : 0
        }
    }

    /// Fills `buffer` entirely; end of stream before that is `.closed`.
    public func readExact(into buffer: UnsafeMutableRawBufferPointer) throws(SocketError) {
        var done = 0
        while done < buffer.count {
            let n = try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
            if n == 0 { throw SocketError("read from", peer: peer, kind: .closed) }
            done += n
        }
    }

    public func writeAll(_ bytes: UnsafeRawBufferPointer) throws(SocketError) {
        var done = 0
        while done < bytes.count {
            let n = Glibc.send(fd, bytes.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { throw SocketError("write to", peer: peer, kind: .timedOut) }
                throw .errno("write to", peer: peer)
            }
            done += n
        }
    }

    public func writeAll(_ bytes: [UInt8]) throws(SocketError) {
        let fd = self.fd
        let failure = bytes.withUnsafeBytes { raw -> SocketError? in
            do { try writeAll(raw); return nil } catch { return error as? SocketError }
        }
        _ = fd
        if let failure { throw failure }
    }

    /// Writes several buffers with as few system calls as possible (sendmsg with an iovec).
    /// `more`: more data follows at once (MSG_MORE), so TCP holds a small piece back to
    /// send it with what follows, even with TCP_NODELAY.
    public func writeAll(_ parts: [UnsafeRawBufferPointer], more: Bool = false) throws(SocketError) {
        let flags = Int32(MSG_NOSIGNAL) | (more ? Int32(MSG_MORE) : 0)
        var iovecs = parts.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var index = 0
        while index < iovecs.count {
            let sent: Int = iovecs.withUnsafeMutableBufferPointer { buf in
                var msg = msghdr()
                msg.msg_iov = buf.baseAddress! + index
                msg.msg_iovlen = buf.count - index
                return sendmsg(fd, &msg, flags)
            }
            if sent < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { throw SocketError("write to", peer: peer, kind: .timedOut) }
                throw .errno("write to", peer: peer)
            }
            var left = sent
            while left > 0 && index < iovecs.count {
                if left >= iovecs[index].iov_len {
                    left -= iovecs[index].iov_len
                    index += 1
                } else {
                    iovecs[index].iov_base = iovecs[index].iov_base! + left
                    iovecs[index].iov_len -= left
                    left = 0
                }
            }
        }
    }

    // MARK: Options and lifetime

    public func setNoDelay() {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Keeps at most `bytes` not yet sent in this TCP socket's buffer (TCP_NOTSENT_LOWAT): a
    /// blocking send waits until the queue is below it, so what the sender queues next (a
    /// chunk that must go ahead of the rest) waits behind that much, not behind a send
    /// buffer autotuned to megabytes. Bytes sent and not yet acknowledged do not count.
    public func setUnsentLowWater(_ bytes: Int) {
        var value = Int32(clamping: max(1, bytes))
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NOTSENT_LOWAT, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Blocking reads fail with `.timedOut` after this long without data (nil: never).
    public func setReceiveTimeout(_ timeout: Duration?) { setTimeout(SO_RCVTIMEO, timeout) }

    /// Blocking writes fail with `.timedOut` after this long without progress (nil: never).
    public func setSendTimeout(_ timeout: Duration?) { setTimeout(SO_SNDTIMEO, timeout) }

    private func setTimeout(_ option: Int32, _ timeout: Duration?) {
        var tv = timeval(tv_sec: 0, tv_usec: 0)
        if let timeout {
            let ms = max(1, timeout.milliseconds)
            tv = timeval(tv_sec: ms / 1000, tv_usec: (ms % 1000) * 1000)
        }
        setsockopt(fd, SOL_SOCKET, option, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Makes the send buffer `bytes` large (beyond net.core.wmem_max where the process may,
    /// as root does), for unix sockets, which have no autotuning: a writer blocked on a full
    /// unix socket is woken only once three quarters of the buffer has drained, so the
    /// buffer's size is the bytes moved per wake-up. Returns the size now in effect.
    @discardableResult
    public func setSendBuffer(_ bytes: Int) -> Int {
        Int(max(0, ferry_set_send_buffer(fd, Int32(clamping: bytes))))
    }

    /// Sends `bytes` with the descriptor `passing` attached (SCM_RIGHTS); unix sockets only.
    public func write(_ bytes: [UInt8], passing descriptor: Int32) throws(SocketError) {
        let n = bytes.withUnsafeBytes { ferry_send_with_fd(fd, $0.baseAddress, UInt($0.count), descriptor) }
        if n < 0 { throw .errno("pass a descriptor to", peer: peer, Int32(-n)) }
        if n < bytes.count { try writeAll(Array(bytes[n...])) }
    }

    /// The kernel's receive buffer for this socket (SO_RCVBUF; TCP grows it as it tunes).
    public var receiveBufferByteCount: Int {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        return getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &value, &length) == 0 ? Int(value) : 0
    }

    /// Reads and readiness wait until `bytes` are queued (SO_RCVLOWAT; 1 is the default):
    /// a reader expecting a large block is then woken once for it instead of for every
    /// few segments. TCP grows a receive buffer too small for the mark and clamps its
    /// window to the mark, so callers keep it well inside ``receiveBufferByteCount``.
    public func setReceiveLowWater(_ bytes: Int) {
        var value = Int32(clamping: max(1, bytes))
        setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Waits until the socket is readable, up to `timeout`. True if readable (or at EOF/error).
    public func waitReadable(timeout: Duration?) -> Bool {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let rc = poll(&pfd, 1, timeout.map { Int32(clamping: $0.milliseconds) } ?? -1)
            if rc < 0 && errno == EINTR { continue }
            return rc > 0
        }
    }

    /// Stops further sends (the peer reads end of stream); reading goes on.
    public func shutdownWrite() {
        closeLock.lock()
        defer { closeLock.unlock() }
        if !closed { Glibc.shutdown(fd, Int32(SHUT_WR)) }
    }

    /// Ends reading: a thread blocked in a read sees end of stream at once, while sends
    /// still work (a migration that is stopped can still tell its peer why).
    public func shutdownRead() {
        closeLock.lock()
        defer { closeLock.unlock() }
        if !closed { Glibc.shutdown(fd, Int32(SHUT_RD)) }
    }

    /// Wakes every thread blocked on this socket; they see end of stream or an error.
    public func shutdown() {
        closeLock.lock()
        defer { closeLock.unlock() }
        if !closed { Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }

    public func close() {
        closeLock.lock()
        defer { closeLock.unlock() }
        if !closed {
            closed = true
            Glibc.close(fd)
        }
    }

    // MARK: Addresses

    struct ResolvedAddress {
        var family: Int32
        var storage: sockaddr_storage
        var length: socklen_t
        func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
            var s = storage
            return withUnsafePointer(to: &s) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) } }
        }
    }

    static func resolve(host: String, port: UInt16, peer: String) throws(SocketError) -> [ResolvedAddress] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | (host.isEmpty ? AI_PASSIVE : 0)
        var result: UnsafeMutablePointer<addrinfo>?
        let h = host.isEmpty ? nil : host
        let rc = getaddrinfo(h, String(port), &hints, &result)
        guard rc == 0, let first = result else { throw SocketError("resolve", peer: peer, kind: .badAddress) }
        defer { freeaddrinfo(first) }
        var out: [ResolvedAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let ai = cursor {
            var storage = sockaddr_storage()
            withUnsafeMutableBytes(of: &storage) { dst in
                dst.copyMemory(from: UnsafeRawBufferPointer(start: ai.pointee.ai_addr, count: Int(ai.pointee.ai_addrlen)))
            }
            out.append(ResolvedAddress(family: ai.pointee.ai_family, storage: storage, length: ai.pointee.ai_addrlen))
            cursor = ai.pointee.ai_next
        }
        return out
    }

    static func unixAddress(_ path: String) throws(SocketError) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else { throw SocketError("use socket path", peer: path, kind: .badAddress) }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return addr
    }

    static func describe(_ storage: inout sockaddr_storage) -> String? {
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var serv = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        if storage.ss_family == sa_family_t(AF_UNIX) { return "unix" }
        let len = socklen_t(storage.ss_family == sa_family_t(AF_INET6) ? MemoryLayout<sockaddr_in6>.size : MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, len, &host, socklen_t(host.count), &serv, socklen_t(serv.count), NI_NUMERICHOST | NI_NUMERICSERV)
            }
        }
        guard rc == 0 else { return nil }
        let h = cString(host), s = cString(serv)
        return h.contains(":") ? "[\(h)]:\(s)" : "\(h):\(s)"
    }
}

extension Duration {
    /// Whole milliseconds (rounded down), for poll and socket options.
    public var milliseconds: Int {
        let (s, atto) = components
        return Int(s) * 1000 + Int(atto / 1_000_000_000_000_000)
    }

    public var seconds: Double {
        let (s, atto) = components
        return Double(s) + Double(atto) / 1e18
    }
}

/// The text of an errno value.
public func errnoDescription(_ code: Int32) -> String {
    guard let text = strerror(code) else { return "errno \(code)" }
    return String(validatingCString: text) ?? "errno \(code)"
}

/// A NUL-terminated C character array as a String.
public func cString(_ chars: [CChar]) -> String {
    let bytes = chars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return String(decoding: bytes, as: UTF8.self)
}

extension Socket {
    /// TCP_USER_TIMEOUT: the connection fails if sent data stays unacknowledged by the
    /// peer's kernel this long. How Ferry notices a NIC that died silently.
    public func setUserTimeout(_ timeout: Duration) {
        var ms = UInt32(max(1, timeout.milliseconds))
        setsockopt(fd, Int32(IPPROTO_TCP), 18 /* TCP_USER_TIMEOUT */, &ms, socklen_t(MemoryLayout<UInt32>.size))
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
        var idle: Int32 = Int32(max(1, timeout.milliseconds / 2000))
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPIDLE, &idle, socklen_t(MemoryLayout<Int32>.size))
        var interval: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPINTVL, &interval, socklen_t(MemoryLayout<Int32>.size))
    }
}

extension Socket {
    /// The numeric local address of a connected TCP socket (what the peer connected to).
    public var localAddress: String? {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        guard rc == 0 else { return nil }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        let ok = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, len, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST)
            }
        }
        guard ok == 0 else { return nil }
        var text = cString(host)
        if text.hasPrefix("::ffff:") { text.removeFirst(7) }  // IPv4 on a dual-stack listener
        return text
    }
}

extension Socket {
    /// A connected pair of Unix stream sockets.
    public static func pair(name: String = "pair") throws(SocketError) -> (Socket, Socket) {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw .errno("socketpair", peer: name)
        }
        return (Socket(fd: fds[0], peer: name + "/0"), Socket(fd: fds[1], peer: name + "/1"))
    }
}

extension Socket {
    /// What the kernel knows of a TCP connection's progress (TCP_INFO).
    public struct TCPProgress: Sendable {
        /// Segments sent and not yet acknowledged by the peer.
        public var unackedSegments: UInt32
        /// Milliseconds since the peer last acknowledged anything.
        public var millisecondsSinceLastAck: UInt32
        public var rttMicroseconds: UInt32
    }

    public func tcpProgress() -> TCPProgress? {
        var info = tcp_info()
        var len = socklen_t(MemoryLayout<tcp_info>.size)
        guard getsockopt(fd, Int32(IPPROTO_TCP), TCP_INFO, &info, &len) == 0 else { return nil }
        return TCPProgress(unackedSegments: info.tcpi_unacked, millisecondsSinceLastAck: info.tcpi_last_ack_recv,
                           rttMicroseconds: info.tcpi_rtt)
    }
}
