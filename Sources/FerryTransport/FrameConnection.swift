import FerryIO
import FerryWire
import Foundation

/// A connection that carries Ferry frames: any thread may send (sends are serialised),
/// one thread receives.
public final class FrameConnection: @unchecked Sendable {
    public let socket: Socket
    private let writeLock = NSLock()
    private var headerScratch = [UInt8](repeating: 0, count: FrameHeader.byteCount + DataChunkHeader.byteCount)
    /// Payload bytes sent and received (frames included), for the report.
    public let counters = Locked(ConnectionCounters())

    public init(socket: Socket) { self.socket = socket }

    public var peer: String { socket.peer }

    // MARK: Sending

    public func send(_ frame: Frame) throws(SocketError) {
        let bytes = frame.encoded()
        writeLock.lock()
        defer { writeLock.unlock() }
        try socket.writeAll(bytes)
        counters.withLock { $0.sentBytes += UInt64(bytes.count) }
    }

    public func send<T: Encodable>(_ type: FrameType, _ message: T) throws(SocketError) {
        try send(ControlCoding.frame(type, message))
    }

    /// Sends a data frame for `chunk` without copying its bytes into a frame buffer:
    /// header and sub-header go out with the bytes in one sendmsg.
    public func sendData(_ header: DataChunkHeader, bytes: UnsafeRawBufferPointer) throws(SocketError) {
        writeLock.lock()
        defer { writeLock.unlock() }
        let failure: SocketError? = headerScratch.withUnsafeMutableBytes { scratch in
            let sub = UnsafeMutableRawBufferPointer(rebasing: scratch[FrameHeader.byteCount...])
            header.write(into: sub)
            var crc = CRC32C.checksum(UnsafeRawBufferPointer(sub))
            crc = CRC32C.update(crc, bytes)
            let frameHeader = FrameHeader(type: .data, length: UInt32(DataChunkHeader.byteCount + bytes.count), payloadCRC: crc)
            frameHeader.write(into: scratch)
            do {
                try socket.writeAll([UnsafeRawBufferPointer(scratch), bytes])
                return nil
            } catch {
                return error as? SocketError
            }
        }
        if let failure { throw failure }
        counters.withLock {
            $0.sentBytes += UInt64(FrameHeader.byteCount + DataChunkHeader.byteCount + bytes.count)
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

    /// Reads the payload `header` announces into a new frame, checking its CRC.
    private func readPayload(of header: FrameHeader) throws -> Frame {
        var payload = [UInt8](repeating: 0, count: Int(header.length))
        if header.length > 0 {
            try payload.withUnsafeMutableBytes { try socket.readExact(into: $0) }
        }
        guard CRC32C.checksum(payload) == header.payloadCRC else { throw WireError.payloadChecksumMismatch }
        counters.withLock { $0.receivedBytes += UInt64(FrameHeader.byteCount + payload.count) }
        return Frame(type: header.type, flags: header.flags, payload: payload)
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
        let length = Int(header.length)
        let size = length - DataChunkHeader.byteCount
        guard size >= 0 else { throw WireError.malformedMessage(.data, "shorter than its header") }
        let target = size <= pool.bufferByteCount ? pool : largePool
        guard let target, size <= target.bufferByteCount else {
            throw WireError.malformedMessage(.data, "chunk of \(size) bytes exceeds \(largePool?.bufferByteCount ?? pool.bufferByteCount)")
        }
        var subBytes = [UInt8](repeating: 0, count: DataChunkHeader.byteCount)
        let sub = try subBytes.withUnsafeMutableBytes { raw -> DataChunkHeader in
            try socket.readExact(into: raw)
            return try DataChunkHeader.parse(UnsafeRawBufferPointer(raw))
        }
        let buffer = target.take()
        try socket.readExact(into: UnsafeMutableRawBufferPointer(rebasing: buffer.space[0..<size]))
        buffer.count = size
        let crc = CRC32C.update(CRC32C.checksum(subBytes), buffer.bytes)
        guard crc == header.payloadCRC else { throw WireError.payloadChecksumMismatch }
        counters.withLock {
            $0.receivedBytes += UInt64(FrameHeader.byteCount + length)
            $0.receivedPayloadBytes += UInt64(size)
        }
        return .data(sub, buffer)
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
