#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CFerryLinux

/// A kernel pipe used as a buffer that user space never reads: bytes go from one socket
/// into it and from it into another with splice(2), as references to the kernel's pages,
/// not copies. `tee(2)` duplicates its content into another pipe, also without copying,
/// which is how a chunk is sent and still kept for a resend until acknowledged.
///
/// A pipe holds at most `slots` page references (one per piece of a socket buffer, which
/// can be as small as one TCP segment), so a pipe for a chunk of N bytes needs many more
/// bytes of nominal capacity than N; see the callers.
///
/// Used by one thread at a time: a pipe moves between threads inside a chunk, through the
/// data path's monitors and its pool's lock.
// The descriptors are immutable; `count` changes only on the thread that holds the pipe
// (two senders of a chunk resent after a failover only read it).
public final class SplicePipe: @unchecked Sendable {
    public let readFD: Int32
    public let writeFD: Int32
    /// Nominal capacity in bytes (slots x page size).
    public let capacity: Int
    /// Bytes now in the pipe, as its owner has counted them.
    public var count = 0

    /// A pipe of at least `capacity` bytes. Throws if the kernel refuses the size (an
    /// unprivileged user above /proc/sys/fs/pipe-max-size) or descriptors run out.
    public init(capacity: Int) throws(SocketError) {
        var fds: [Int32] = [-1, -1]
        let rc = ferry_pipe(&fds, Int32(capacity))
        guard rc == 0 else { throw SocketError.errno("create a pipe of \(capacity) bytes", peer: "", -rc) }
        readFD = fds[0]
        writeFD = fds[1]
        self.capacity = capacity
    }

    deinit {
        Glibc.close(readFD)
        Glibc.close(writeFD)
    }

    /// Moves up to `max` bytes from `fd` (a socket) into the pipe. Blocks for the socket
    /// unless `nonblocking`, in which case nil means nothing could be moved now (the
    /// socket has no data or the pipe no free slot). Returns 0 at end of stream.
    public func fill(from fd: Int32, max: Int, nonblocking: Bool, peer: String) throws(SocketError) -> Int? {
        let n = ferry_splice(fd, writeFD, max, 0, nonblocking ? 1 : 0)
        if n == -Int(EAGAIN) {
            if nonblocking { return nil }
            throw SocketError("splice from", peer: peer, kind: .timedOut)
        }
        if n < 0 { throw SocketError.errno("splice from", peer: peer, Int32(-n)) }
        count += n
        return n
    }

    /// Duplicates this pipe's whole content into `other` (which must be empty and as
    /// large): page references, no copy; this pipe keeps its bytes.
    public func duplicate(into other: SplicePipe) throws(SocketError) {
        let n = ferry_tee(readFD, other.writeFD, count)
        if n < 0 { throw SocketError.errno("tee a pipe", peer: "", Int32(-n)) }
        // tee takes whole pipe buffers; a short count means `other` had no free slot.
        guard n == count else { throw SocketError("tee a pipe (\(n) of \(count) bytes)", peer: "", kind: .system(ENOSPC)) }
        other.count += n
    }

    /// Moves the pipe's whole content into `fd` (a socket), blocking for it. `more`: more
    /// data follows at once (the socket may hold the last segment back to fill it).
    public func drain(into fd: Int32, more: Bool, peer: String) throws(SocketError) {
        while count > 0 {
            let n = ferry_splice(readFD, fd, count, more ? 1 : 0, 0)
            if n == -Int(EAGAIN) { throw SocketError("splice to", peer: peer, kind: .timedOut) }
            if n < 0 { throw SocketError.errno("splice to", peer: peer, Int32(-n)) }
            if n == 0 { throw SocketError("splice to", peer: peer, kind: .closed) }
            count -= n
        }
    }

    /// Drops the content (its pages are released, nothing is copied). False if that
    /// failed, in which case the pipe must not be reused.
    @discardableResult
    public func discard() -> Bool {
        while count > 0 {
            let n = ferry_splice(readFD, Self.devNull, count, 0, 1)
            if n <= 0 { return false }
            count -= n
        }
        return true
    }

    /// Copies the content out into `buffer` (read(2): the fallback when a chunk cannot
    /// stay in the pipe). Returns the bytes read; the pipe is empty afterwards.
    public func readAll(into buffer: UnsafeMutableRawBufferPointer) throws(SocketError) -> Int {
        var done = 0
        while count > 0 && done < buffer.count {
            let n = Glibc.read(readFD, buffer.baseAddress! + done, min(count, buffer.count - done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SocketError.errno("read a pipe", peer: "")
            }
            if n == 0 { break }
            done += n
            count -= n
        }
        return done
    }

    /// /dev/null, where discarded pipe content goes (splice_write_null: no copy).
    private static let devNull: Int32 = open("/dev/null", O_WRONLY | O_CLOEXEC)

    /// Whether this kernel and user can make pipes of `capacity` bytes and splice a
    /// socket into them: checked once with a socket pair.
    public static func isUsable(capacity: Int) -> Bool {
        guard let pipe = try? SplicePipe(capacity: capacity), let (a, b) = try? Socket.pair(name: "splice probe") else { return false }
        defer { a.close(); b.close() }
        guard (try? a.writeAll([1, 2, 3])) != nil, (try? pipe.fill(from: b.fd, max: 3, nonblocking: false, peer: "probe")) == 3 else { return false }
        return pipe.discard()
    }
}
