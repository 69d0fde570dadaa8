#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import FerryIO
import Foundation

/// A Unix datagram socket: the reporter's unbound sender, or the daemon's bound receiver.
/// FerryIO's ``Socket`` is for streams; this is the little a datagram needs.
// `fd` is immutable; `closed` is under `lock`.
final class UnixDatagram: @unchecked Sendable {
    let fd: Int32
    let path: String?
    private let lock = Monitor()
    private var closed = false

    private init(fd: Int32, path: String?) {
        self.fd = fd
        self.path = path
    }

    deinit { close() }

    /// An unbound socket that sends without ever blocking.
    static func sender() throws(SocketError) -> UnixDatagram {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw SocketError("socket for", peer: "metrics", kind: .system(errno)) }
        return UnixDatagram(fd: fd, path: nil)
    }

    /// A socket bound at `path` (an old file there is replaced), readable by its owner
    /// only: mode 0600, set before it can receive.
    static func receiver(path: String) throws(SocketError) -> UnixDatagram {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketError("socket for", peer: path, kind: .system(errno)) }
        let socket = UnixDatagram(fd: fd, path: path)
        unlink(path)
        // The file is created with the umask's mode; 0177 makes it 0600 from the start.
        let old = umask(0o177)
        let rc = try withAddress(path) { bind(fd, $0, $1) }
        umask(old)
        guard rc == 0 else { throw SocketError("bind", peer: path, kind: .system(errno)) }
        chmod(path, 0o600)
        return socket
    }

    /// Sends one datagram to `path`; false if it did not go (no receiver, its queue full,
    /// too large). Never blocks.
    @discardableResult
    func send(_ bytes: [UInt8], to path: String) -> Bool {
        let sent = (try? Self.withAddress(path) { address, length in
            bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL), address, length) }
        }) ?? -1
        return sent == bytes.count
    }

    /// Waits up to `timeout` for a datagram; nil on timeout. A datagram longer than
    /// `capacity` comes back cut (MSG_TRUNC tells: its length is then more than capacity).
    func receive(capacity: Int, timeout: Duration) -> [UInt8]? {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, Int32(timeout.milliseconds)) > 0 else { return nil }
        var buffer = [UInt8](repeating: 0, count: capacity)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT) | Int32(MSG_TRUNC)) }
        guard n >= 0 else { return nil }
        if n > capacity { return [] }  // too large: dropped whole
        return Array(buffer[0..<n])
    }

    func close() {
        lock.withLock {
            guard !closed else { return }
            closed = true
            Glibc.close(fd)
        }
    }

    private static func withAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) throws(SocketError) -> R {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw SocketError("use socket path", peer: path, kind: .badAddress)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}
