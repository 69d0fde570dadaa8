import FerryCompress
import FerryIO
import FerryWire
import Foundation

/// A connection that carries Ferry frames: any thread may send (sends are serialised),
/// one thread receives at a time (a handshake's thread, then the channel's receiver or
/// the session's reader, each starting after the previous one's last frame).
// The send side (`sealer`, `headerScratch`) is under `writeLock`; the receive side
// (`opener`, `decompressor`, `receivedSealed`) is the receiving thread's; `counters` locks itself.
public final class FrameConnection: @unchecked Sendable {
    public let socket: Socket
    private let writeLock = Monitor()
    private var headerScratch = [UInt8](repeating: 0, count: FrameHeader.byteCount + DataChunkHeader.byteCount + CompressionHeader.byteCount)
    /// The receiving thread's, made on the first compressed chunk.
    private var decompressor: Decompressor?
    /// Payload bytes sent and received (frames included), for the report.
    public let counters = Locked(ConnectionCounters())
    /// Set once the connection is authenticated (``secure(send:receive:)``): from then on
    /// every frame in both directions is sealed, and an unsealed one is refused.
    private var sealer: FrameSealer?  // under writeLock
    private var opener: FrameOpener?  // the receiving thread's
    private var receivedSealed = false

    public init(socket: Socket) { self.socket = socket }

    /// Seals every frame sent from now on and requires every frame received to be sealed.
    /// Call between frames, before the receiving thread reads the next one.
    public func secure(send: FrameSealer, receive: FrameOpener) {
        writeLock.withLock { sealer = send }
        opener = receive
    }

    public var isSecured: Bool { writeLock.withLock { sealer != nil } }

    public var peer: String { socket.peer }

    // MARK: Sending

    public func send(_ frame: Frame) throws(SocketError) {
        writeLock.lock()
        defer { writeLock.unlock() }
        var frame = frame
        if let sealer {
            frame.flags.insert(.sealed)
            frame.payload = Array(frame.payload.withUnsafeBytes { sealer.seal(frame.type, frame.flags, $0) })
        }
        let bytes = frame.encoded()
        try socket.writeAll(bytes)
        counters.withLock { $0.sentBytes += UInt64(bytes.count) }
    }

    public func send<T: Encodable>(_ type: FrameType, _ message: T) throws(SocketError) {
        try send(ControlCoding.frame(type, message))
    }

    /// A chunk's bytes as compressed by the sender: the header that describes them, and
    /// the compressed bytes.
    public struct Compressed {
        public var header: CompressionHeader
        public var bytes: UnsafeRawBufferPointer
        public init(header: CompressionHeader, bytes: UnsafeRawBufferPointer) {
            self.header = header
            self.bytes = bytes
        }
    }

    /// Sends a data frame for a chunk without copying its bytes into a frame buffer:
    /// header, sub-header(s) and bytes go out in one sendmsg. `bytes` are the chunk's
    /// own; `compressed`, if given, goes on the wire instead of them.
    public func sendData(_ header: DataChunkHeader, bytes: UnsafeRawBufferPointer, compressed: Compressed? = nil) throws(SocketError) {
        writeLock.lock()
        defer { writeLock.unlock() }
        var wire = 0
        let failure: SocketError? = headerScratch.withUnsafeMutableBytes { scratch in
            let clearCount = DataChunkHeader.byteCount + (compressed == nil ? 0 : CompressionHeader.byteCount)
            let clear = UnsafeMutableRawBufferPointer(rebasing: scratch[FrameHeader.byteCount..<FrameHeader.byteCount + clearCount])
            header.write(into: clear)
            if let compressed { compressed.header.write(into: UnsafeMutableRawBufferPointer(rebasing: clear[DataChunkHeader.byteCount...])) }
            var flags: FrameFlags = sealer == nil ? [] : [.sealed]
            if compressed != nil { flags.insert(.compressed) }
            let body = compressed?.bytes ?? bytes
            // The body goes out in one or two pieces: the bytes, or ciphertext and tag.
            func send(_ pieces: [UnsafeRawBufferPointer]) -> SocketError? {
                // A sealed frame's tag checks every byte, so its CRC is not computed (0).
                var crc: UInt32 = 0
                if sealer == nil {
                    crc = CRC32C.checksum(UnsafeRawBufferPointer(clear))
                    for piece in pieces { crc = CRC32C.update(crc, piece) }
                }
                let bodyCount = pieces.reduce(0) { $0 + $1.count }
                let frameHeader = FrameHeader(type: .data, flags: flags, length: UInt32(clearCount + bodyCount), payloadCRC: crc)
                frameHeader.write(into: scratch)
                wire = FrameHeader.byteCount + clearCount + bodyCount
                do {
                    try socket.writeAll([UnsafeRawBufferPointer(rebasing: scratch[..<(FrameHeader.byteCount + clearCount)])] + pieces)
                    return nil
                } catch {
                    return error
                }
            }
            // Sealed: the sub-headers stay clear (authenticated), the bytes are encrypted.
            if let sealer {
                return sealer.seal(.data, flags, header: UnsafeRawBufferPointer(clear), body) { ciphertext, tag in send([ciphertext, tag]) }
            }
            return send([body])
        }
        if let failure { throw failure }
        counters.withLock {
            $0.sentBytes += UInt64(wire)
            $0.sentPayloadBytes += UInt64(bytes.count)
        }
    }

    /// Sends a data frame whose bytes are in a pipe (the zero-copy path): the headers go
    /// out with MSG_MORE, then the bytes are duplicated into `scratch` (tee: page
    /// references) and spliced from there into the socket, so the chunk keeps its bytes
    /// for a resend and nothing is copied through user memory. The frame is `unchecked`
    /// (no CRC: Ferry never sees the bytes). Unsealed connections only.
    public func sendSpliced(_ header: DataChunkHeader, _ chunk: PipeChunk, via scratch: SplicePipe) throws(SocketError) {
        writeLock.lock()
        defer { writeLock.unlock() }
        precondition(sealer == nil, "a sealed connection cannot send spliced chunks")
        let count = chunk.count
        defer { if scratch.count > 0 { scratch.discard() } }
        let headerBytes = FrameHeader.byteCount + DataChunkHeader.byteCount
        let failure: SocketError? = headerScratch.withUnsafeMutableBytes { scratchBytes -> SocketError? in
            header.write(into: UnsafeMutableRawBufferPointer(rebasing: scratchBytes[FrameHeader.byteCount..<headerBytes]))
            FrameHeader(type: .data, flags: [.unchecked], length: UInt32(DataChunkHeader.byteCount + count), payloadCRC: 0)
                .write(into: scratchBytes)
            do {
                try socket.writeAll([UnsafeRawBufferPointer(rebasing: scratchBytes[..<headerBytes])], more: true)
                return nil
            } catch let error as SocketError {
                return error
            } catch {
                return SocketError("write to", peer: socket.peer, kind: .closed)
            }
        }
        if let failure { throw failure }
        try chunk.pipe.duplicate(into: scratch)
        try scratch.drain(into: socket.fd, more: false, peer: socket.peer)
        counters.withLock {
            $0.sentBytes += UInt64(headerBytes + count)
            $0.sentPayloadBytes += UInt64(count)
        }
    }

    // MARK: Receiving

    /// Reads one whole, checked frame (blocking). End of stream is `.closed`.
    public func receive() throws -> Frame {
        try readPayload(of: try readHeader())
    }

    /// Reads and checks a frame header (magic, version, CRC, type, length, flags).
    private func readHeader() throws -> FrameHeader {
        var bytes = [UInt8](repeating: 0, count: FrameHeader.byteCount)
        try bytes.withUnsafeMutableBytes { try socket.readExact(into: $0) }
        let header = try bytes.withUnsafeBytes { try FrameHeader.parse($0) }
        guard header.flags.isSubset(of: .known) else { throw WireError.unknownFlags(header.flags.rawValue) }
        return header
    }

    /// Reads the payload `header` announces into a new frame, checking its CRC and, on a
    /// secured connection, opening its seal.
    private func readPayload(of header: FrameHeader) throws -> Frame {
        if header.flags.contains(.unchecked) {
            throw WireError.malformedMessage(header.type, "only data frames may go unchecked")
        }
        var payload = [UInt8](repeating: 0, count: Int(header.length))
        if header.length > 0 {
            try payload.withUnsafeMutableBytes { try socket.readExact(into: $0) }
        }
        guard CRC32C.checksum(payload) == header.payloadCRC else { throw WireError.payloadChecksumMismatch }
        counters.withLock { $0.receivedBytes += UInt64(FrameHeader.byteCount + payload.count) }
        if try checkSeal(header), let opener {
            payload = Array(try payload.withUnsafeBytes { raw in try opener.open(header.type, header.flags, raw) })
            receivedSealed = true
        }
        return Frame(type: header.type, flags: header.flags.subtracting(.sealed), payload: payload)
    }

    /// A secured connection takes only sealed frames, an unsecured one none. The one
    /// exception: an unsealed `error` before the first sealed frame, which is how a peer
    /// that refused our proof says why (it has no keys to seal with). Such an error can
    /// only end the connection, which anyone on the path could do anyway.
    /// Returns whether the frame is to be opened.
    private func checkSeal(_ header: FrameHeader) throws(SecurityError) -> Bool {
        let sealed = header.flags.contains(.sealed)
        if opener != nil && !sealed {
            if header.type == .error && !receivedSealed { return false }
            throw .sealedFrameRejected("an unsealed \(header.type) frame on an authenticated connection")
        }
        if opener == nil && sealed {
            throw .sealedFrameRejected("a sealed \(header.type) frame before the connection was authenticated")
        }
        return sealed
    }

    /// What ``receive(dataInto:)`` read: a data chunk in a pooled buffer, or another frame.
    public enum Received {
        case data(DataChunkHeader, ChunkBuffer)
        /// A chunk spliced from the socket into a pipe (zero-copy), to be spliced on.
        case splicedData(DataChunkHeader, PipeChunk)
        case frame(Frame)
    }

    /// Reads one frame; a `data` frame's bytes go straight into a buffer from `pool`
    /// (checked against the payload CRC there), other frames are returned whole.
    ///
    /// An `unchecked` frame (the sender spliced it) goes into a pipe from `pipes` when
    /// given, so that it can be spliced on to QEMU without a copy; without `pipes`, or
    /// when the pipe runs out of slots, its bytes land in a buffer as usual.
    public func receive(dataInto pool: BufferPool, largerInto largePool: BufferPool? = nil, pipes: PipePool? = nil) throws -> Received {
        let header = try readHeader()
        guard header.type == .data else { return .frame(try readPayload(of: header)) }
        guard try checkSeal(header) || opener == nil else {
            throw SecurityError.sealedFrameRejected("an unsealed data frame on an authenticated connection")
        }
        if header.flags.contains(.unchecked) {
            return try receiveUnchecked(header, pool: pool, largePool: largePool, pipes: pipes)
        }
        let length = Int(header.length)
        let tagSize = opener == nil ? 0 : FrameSeal.tagByteCount
        let isCompressed = header.flags.contains(.compressed)
        let clearCount = DataChunkHeader.byteCount + (isCompressed ? CompressionHeader.byteCount : 0)
        let size = length - clearCount - tagSize
        guard size >= 0 else { throw WireError.malformedMessage(.data, "shorter than its header") }
        let smallPool = pool
        func poolFor(_ size: Int) throws -> BufferPool {
            let target = size <= smallPool.bufferByteCount ? smallPool : largePool
            guard let target, size <= target.bufferByteCount else {
                throw WireError.malformedMessage(.data, "chunk of \(size) bytes exceeds \(largePool?.bufferByteCount ?? smallPool.bufferByteCount)")
            }
            return target
        }
        let target = try poolFor(size)
        var subBytes = [UInt8](repeating: 0, count: clearCount)
        try subBytes.withUnsafeMutableBytes { try socket.readExact(into: $0) }
        let sub = try subBytes.withUnsafeBytes { try DataChunkHeader.parse($0) }
        var compression: CompressionHeader?
        if isCompressed {
            compression = try subBytes.withUnsafeBytes { try CompressionHeader.parse(UnsafeRawBufferPointer(rebasing: $0[DataChunkHeader.byteCount...])) }
        }
        if let compression {
            // A sender compresses only what shrinks, so the raw size is the larger.
            guard Int(compression.rawByteCount) > size else {
                throw WireError.malformedMessage(.data, "compressed chunk of \(size) bytes claims \(compression.rawByteCount) raw")
            }
            _ = try poolFor(Int(compression.rawByteCount))
        }
        let buffer = target.take()
        try awaitingBody(size) { () throws(SocketError) in
            try socket.readExact(into: UnsafeMutableRawBufferPointer(rebasing: buffer.space[0..<size]))
        }
        buffer.count = size
        var tag = [UInt8](repeating: 0, count: tagSize)
        if tagSize > 0 { try tag.withUnsafeMutableBytes { try socket.readExact(into: $0) } }
        // A sealed frame carries no CRC: its tag, checked below, covers every byte.
        if opener == nil {
            let crc = CRC32C.update(CRC32C.checksum(subBytes), buffer.bytes)
            guard crc == header.payloadCRC else { throw WireError.payloadChecksumMismatch }
        }
        if let opener {
            // Decrypted where it landed: no copy.
            try subBytes.withUnsafeBytes { sub in
                try tag.withUnsafeBytes { t in
                    try opener.openInPlace(.data, header.flags, header: sub, UnsafeMutableRawBufferPointer(rebasing: buffer.space[0..<size]), tag: t)
                }
            }
        }
        var chunk = buffer
        if let compression {
            chunk = try decompress(buffer, compression, into: try poolFor(Int(compression.rawByteCount)), chunk: sub)
        }
        counters.withLock {
            $0.receivedBytes += UInt64(FrameHeader.byteCount + length)
            $0.receivedPayloadBytes += UInt64(chunk.count)
        }
        return .data(sub, chunk)
    }

    /// Receives an `unchecked` data frame (see ``receive(dataInto:largerInto:pipes:)``).
    private func receiveUnchecked(_ header: FrameHeader, pool: BufferPool, largePool: BufferPool?, pipes: PipePool?) throws -> Received {
        if opener != nil {
            throw SecurityError.sealedFrameRejected("an unchecked data frame on an authenticated connection")
        }
        guard !header.flags.contains(.compressed), header.payloadCRC == 0 else {
            throw WireError.malformedMessage(.data, "an unchecked frame must be uncompressed and carry CRC 0")
        }
        let size = Int(header.length) - DataChunkHeader.byteCount
        guard size >= 0 else { throw WireError.malformedMessage(.data, "shorter than its header") }
        var subBytes = [UInt8](repeating: 0, count: DataChunkHeader.byteCount)
        try subBytes.withUnsafeMutableBytes { try socket.readExact(into: $0) }
        let sub = try subBytes.withUnsafeBytes { try DataChunkHeader.parse($0) }
        counters.withLock {
            $0.receivedBytes += UInt64(FrameHeader.byteCount) + UInt64(header.length)
            $0.receivedPayloadBytes += UInt64(size)
        }
        var partial: PipeChunk?
        if let pipes, size <= pipes.pipeCapacity / ChunkPolicy.pipeSlotMargin, let chunk = try? pipes.take() {
            // TCP's splice waits for the bytes; it stops early only if the pipe has no
            // free slot left (many small segments), and then the bytes are copied.
            var left = size
            try awaitingBody(size) { () throws(SocketError) in
                while left > 0, let n = try chunk.pipe.fill(from: socket.fd, max: left, nonblocking: true, peer: socket.peer) {
                    if n == 0 { throw SocketError("read from", peer: socket.peer, kind: .closed) }
                    left -= n
                }
            }
            if left == 0 { return .splicedData(sub, chunk) }
            partial = chunk
        }
        let target = size <= pool.bufferByteCount ? pool : largePool
        guard let target, size <= target.bufferByteCount else {
            throw WireError.malformedMessage(.data, "chunk of \(size) bytes exceeds \(largePool?.bufferByteCount ?? pool.bufferByteCount)")
        }
        let buffer = target.take()
        let already = try partial.map { try $0.pipe.readAll(into: buffer.space) } ?? 0
        try socket.readExact(into: UnsafeMutableRawBufferPointer(rebasing: buffer.space[already..<size]))
        buffer.count = size
        return .data(sub, buffer)
    }

    /// Runs `body`, which reads a chunk's `size` bytes, once that many are queued: the
    /// thread waits in poll with the socket's low-water mark at `size` (at most a quarter
    /// of the receive buffer, see ``Socket/setReceiveLowWater(_:)``), so it wakes once for
    /// the chunk, not for every few segments (3 to 4 wake-ups per 256 KiB chunk on a
    /// 1 Gbit/s channel). The mark is back at 1 byte before `body` reads: with a mark above
    /// what is left to read, a blocking read could wait for bytes that never come.
    private func awaitingBody<R>(_ size: Int, _ body: () throws(SocketError) -> R) throws(SocketError) -> R {
        let mark = min(size, socket.receiveBufferByteCount / 4)
        if mark > Self.lowWaterMinimum {
            socket.setReceiveLowWater(mark)
            _ = socket.waitReadable(timeout: nil)
            socket.setReceiveLowWater(1)
        }
        return try body()
    }

    /// Below this a low-water mark saves too little to pay for its two system calls.
    static let lowWaterMinimum = 16 << 10

    /// Decompresses a received chunk into a buffer of its raw size and checks its CRC.
    private func decompress(_ compressed: ChunkBuffer, _ header: CompressionHeader, into pool: BufferPool, chunk: DataChunkHeader) throws -> ChunkBuffer {
        let what = "compressed chunk \(chunk.sequence) of stream \(chunk.stream)"
        guard let codec = Codec(wireID: header.codec) else {
            throw WireError.malformedMessage(.data, "\(what): unknown codec \(header.codec)")
        }
        let raw = Int(header.rawByteCount)
        let output = pool.take()
        if decompressor == nil { decompressor = Decompressor() }
        do {
            try decompressor!.decompress(codec, from: compressed.bytes, into: UnsafeMutableRawBufferPointer(rebasing: output.space[0..<raw]),
                                         expectedByteCount: raw)
        } catch {
            throw WireError.malformedMessage(.data, "\(what) refused: \(error)")
        }
        output.count = raw
        guard CRC32C.checksum(output.bytes) == header.rawCRC else {
            throw WireError.malformedMessage(.data, "\(what) decompressed to other bytes than were sent (CRC mismatch)")
        }
        return output
    }

    /// Reads a frame; an `error` frame from the peer is thrown as ``ErrorMessage``.
    public func receiveChecked() throws -> Frame {
        let frame = try receive()
        if frame.type == .error {
            throw (try? ControlCoding.decode(ErrorMessage.self, from: frame))
                ?? ErrorMessage(code: .protocolViolation, message: "peer sent an unreadable error frame")
        }
        return frame
    }

    /// Reads a frame that must be of `type` and decodes its JSON payload.
    public func expect<T: Decodable>(_ type: FrameType, as message: T.Type) throws -> T {
        let frame = try receiveChecked()
        guard frame.type == type else { throw WireError.unexpectedFrame(frame.type, expected: "\(type)") }
        return try ControlCoding.decode(T.self, from: frame)
    }

    /// Sends an error frame (best effort) and shuts the connection.
    public func fail(_ code: ErrorCode, _ message: String) {
        try? send(.error, ErrorMessage(code: code, message: message))
        socket.shutdownWrite()
    }

    public func shutdown() { socket.shutdown() }
    public func close() { socket.close() }
}

public struct ConnectionCounters: Sendable {
    public var sentBytes: UInt64 = 0
    public var sentPayloadBytes: UInt64 = 0
    public var receivedBytes: UInt64 = 0
    public var receivedPayloadBytes: UInt64 = 0
}
