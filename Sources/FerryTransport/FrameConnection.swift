import FerryCompress
import FerryIO
import FerryWire
import Foundation

/// A connection that carries Ferry frames: any thread may send (sends are serialised),
/// one thread receives.
public final class FrameConnection: @unchecked Sendable {
    public let socket: Socket
    private let writeLock = NSLock()
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
                var crc = CRC32C.checksum(UnsafeRawBufferPointer(clear))
                for piece in pieces { crc = CRC32C.update(crc, piece) }
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
        case frame(Frame)
    }

    /// Reads one frame; a `data` frame's bytes go straight into a buffer from `pool`
    /// (checked against the payload CRC there), other frames are returned whole.
    public func receive(dataInto pool: BufferPool, largerInto largePool: BufferPool? = nil) throws -> Received {
        let header = try readHeader()
        guard header.type == .data else { return .frame(try readPayload(of: header)) }
        guard try checkSeal(header) || opener == nil else {
            throw SecurityError.sealedFrameRejected("an unsealed data frame on an authenticated connection")
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
        try socket.readExact(into: UnsafeMutableRawBufferPointer(rebasing: buffer.space[0..<size]))
        buffer.count = size
        var tag = [UInt8](repeating: 0, count: tagSize)
        if tagSize > 0 { try tag.withUnsafeMutableBytes { try socket.readExact(into: $0) } }
        let bodyCRC = CRC32C.update(CRC32C.checksum(subBytes), buffer.bytes)
        let crc = tag.withUnsafeBytes { CRC32C.update(bodyCRC, $0) }
        guard crc == header.payloadCRC else { throw WireError.payloadChecksumMismatch }
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
