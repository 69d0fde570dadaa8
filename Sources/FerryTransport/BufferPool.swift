import FerryIO
import Foundation

/// A chunk's bytes: a fixed-capacity buffer that goes back to its pool when the last
/// reference to it is dropped (after the destination acknowledged it, or QEMU was given it).
///
/// Steady state allocates nothing: the window bounds how many buffers are alive, and the
/// pool keeps them for the next chunks. Reads from QEMU and from the network land directly
/// in these buffers, and sends go out from them, so a chunk's bytes are not copied in
/// user space on either side.
///
/// Used by one thread at a time: the thread that fills it, then (through the data path's
/// monitor) the threads that send or write it, which only read.
// `base` and `capacity` are immutable; `count` is set by the filling thread before the
// buffer is handed on under a monitor, and only read after that.
public final class ChunkBuffer: @unchecked Sendable {
    public let capacity: Int
    public let base: UnsafeMutableRawPointer
    /// Bytes in use, from `base`.
    public var count: Int
    private let pool: BufferPool?

    init(capacity: Int, base: UnsafeMutableRawPointer, pool: BufferPool?) {
        self.capacity = capacity
        self.base = base
        self.count = 0
        self.pool = pool
    }

    /// A standalone buffer holding a copy of `bytes` (tests, small control data).
    public convenience init(copying bytes: [UInt8]) {
        let capacity = max(1, bytes.count)
        let base = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
        self.init(capacity: capacity, base: base, pool: nil)
        bytes.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        count = bytes.count
    }

    deinit {
        if let pool { pool.giveBack(base) } else { base.deallocate() }
    }

    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: count) }
    public var space: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: capacity) }
    public var array: [UInt8] { Array(bytes) }
}

/// Buffers of one size, reused. Any thread takes and gives back (a chunk's last reference
/// may drop on any of the data path's threads).
// `free` and `allocated` are under `lock`; the rest is immutable.
public final class BufferPool: @unchecked Sendable {
    public let bufferByteCount: Int
    private let lock = Monitor()
    private var free: [UnsafeMutableRawPointer] = []
    private var allocated = 0
    /// Keep at most this many free buffers; more are released to the system.
    private let keep: Int

    public init(bufferByteCount: Int, keep: Int) {
        self.bufferByteCount = bufferByteCount
        self.keep = keep
    }

    deinit {
        for p in free { p.deallocate() }
    }

    public func take() -> ChunkBuffer {
        let base = lock.withLock { () -> UnsafeMutableRawPointer? in
            if let p = free.popLast() { return p }
            allocated += 1
            return nil
        } ?? UnsafeMutableRawPointer.allocate(byteCount: bufferByteCount, alignment: 4096)
        return ChunkBuffer(capacity: bufferByteCount, base: base, pool: self)
    }

    func giveBack(_ base: UnsafeMutableRawPointer) {
        let release = lock.withLock { () -> Bool in
            if free.count < keep {
                free.append(base)
                return false
            }
            allocated -= 1
            return true
        }
        if release { base.deallocate() }
    }

    /// Buffers alive now (in use or kept free).
    public var allocatedCount: Int { lock.withLock { allocated } }
}

/// A chunk's bytes held in a kernel pipe, for the zero-copy path: they went from QEMU's
/// socket into the pipe (or from a data channel into it) by splice and leave the same way,
/// never copied into Ferry's memory. Going out of use returns the pipe to its pool.
/// Used by one thread at a time, like its ``SplicePipe``.
public final class PipeChunk: Sendable {
    public let pipe: SplicePipe
    private let pool: PipePool?

    init(pipe: SplicePipe, pool: PipePool?) {
        self.pipe = pipe
        self.pool = pool
    }

    deinit { pool?.giveBack(pipe) }

    /// Bytes in the pipe.
    public var count: Int { pipe.count }
}

/// Pipes for ``PipeChunk``s, reused like ``BufferPool``'s buffers: a pipe given back is
/// emptied (its pages dropped, not copied) when it is taken again, by the taking thread,
/// so that the thread releasing a chunk (the one reading acknowledgements) does no system
/// call for it. Any thread takes and gives back.
// `free` and `allocated` are under `lock`; a pipe in `free` belongs to no thread.
public final class PipePool: @unchecked Sendable {
    /// Nominal capacity of each pipe (see ``SplicePipe``).
    public let pipeCapacity: Int
    private let lock = Monitor()
    private var free: [SplicePipe] = []
    private var allocated = 0
    private let keep: Int

    public init(pipeCapacity: Int, keep: Int) {
        self.pipeCapacity = pipeCapacity
        self.keep = keep
    }

    /// An empty pipe; throws if none can be made (descriptors or pipe memory exhausted),
    /// in which case the caller falls back to copying.
    public func take() throws(SocketError) -> PipeChunk {
        while let pipe = lock.withLock({ free.popLast() }) {
            if pipe.count == 0 || pipe.discard() { return PipeChunk(pipe: pipe, pool: self) }
            lock.withLock { allocated -= 1 }  // could not be emptied: let it go
        }
        let pipe = try SplicePipe(capacity: pipeCapacity)
        lock.withLock { allocated += 1 }
        return PipeChunk(pipe: pipe, pool: self)
    }

    func giveBack(_ pipe: SplicePipe) {
        lock.withLock {
            if free.count < keep {
                free.append(pipe)
            } else {
                allocated -= 1
            }
        }
    }

    /// Pipes alive now (in use or kept free).
    public var allocatedCount: Int { lock.withLock { allocated } }
}

/// A received chunk's bytes: in memory (read, checked), or in a pipe (spliced).
public enum ChunkBytes: Sendable {
    case memory(ChunkBuffer)
    case pipe(PipeChunk)

    public var count: Int {
        switch self {
        case .memory(let buffer): return buffer.count
        case .pipe(let pipe): return pipe.count
        }
    }
}
