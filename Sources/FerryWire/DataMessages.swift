import Crypto
import Foundation

/// The sub-header of a `data` frame, followed by the chunk's bytes.
///
/// ```
///  0        4                12               20
///  +--------+----------------+----------------+------...
///  | stream |  sequence      |  byte offset   | bytes
///  +--------+----------------+----------------+------...
/// ```
/// `sequence` counts the chunks of one stream from 0; `byte offset` is where the chunk
/// starts in the stream (checked by the receiver: a gap or overlap is a protocol error).
public struct DataChunkHeader: Equatable, Sendable {
    public static let byteCount = 20
    public var stream: UInt32
    public var sequence: UInt64
    public var offset: UInt64

    public init(stream: UInt32, sequence: UInt64, offset: UInt64) {
        self.stream = stream
        self.sequence = sequence
        self.offset = offset
    }

    public func write(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.byteCount)
        buffer.storeBytes(of: stream.bigEndian, toByteOffset: 0, as: UInt32.self)
        buffer.storeBytes(of: sequence.bigEndian, toByteOffset: 4, as: UInt64.self)
        buffer.storeBytes(of: offset.bigEndian, toByteOffset: 12, as: UInt64.self)
    }

    public static func parse(_ raw: UnsafeRawBufferPointer) throws(WireError) -> DataChunkHeader {
        guard raw.count >= byteCount else { throw .malformedMessage(.data, "chunk shorter than its header") }
        return DataChunkHeader(
            stream: UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self)),
            sequence: UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt64.self)),
            offset: UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 12, as: UInt64.self)))
    }
}

/// Follows the ``DataChunkHeader`` of a `data` frame with the `compressed` flag, in clear
/// (and authenticated when sealed); the compressed bytes come after it.
///
/// ```
///  0       1        4              8              12
///  +-------+--------+--------------+--------------+------...
///  | codec |reserved| raw length   | raw CRC32C   | compressed bytes
///  +-------+--------+--------------+--------------+------...
/// ```
/// `codec` is 1 for LZ4 (block format), 2 for zstd (one frame); 0 is invalid. The receiver
/// decompresses into exactly `raw length` bytes and checks their CRC32C, so that a
/// compressed chunk that decodes to other bytes (a corrupted literal decodes without
/// complaint in both formats) is refused, not fed to QEMU.
public struct CompressionHeader: Equatable, Sendable {
    public static let byteCount = 12
    public var codec: UInt8
    public var rawByteCount: UInt32
    public var rawCRC: UInt32

    public init(codec: UInt8, rawByteCount: UInt32, rawCRC: UInt32) {
        self.codec = codec
        self.rawByteCount = rawByteCount
        self.rawCRC = rawCRC
    }

    public func write(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.byteCount)
        buffer[0] = codec
        buffer[1] = 0; buffer[2] = 0; buffer[3] = 0
        buffer.storeBytes(of: rawByteCount.bigEndian, toByteOffset: 4, as: UInt32.self)
        buffer.storeBytes(of: rawCRC.bigEndian, toByteOffset: 8, as: UInt32.self)
    }

    public static func parse(_ raw: UnsafeRawBufferPointer) throws(WireError) -> CompressionHeader {
        guard raw.count >= byteCount else { throw .malformedMessage(.data, "shorter than its compression header") }
        guard raw[0] != 0 else { throw .malformedMessage(.data, "compression codec 0 is invalid") }
        guard raw[1] == 0 && raw[2] == 0 && raw[3] == 0 else { throw .malformedMessage(.data, "reserved compression header bytes are not zero") }
        return CompressionHeader(codec: raw[0],
                                 rawByteCount: UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self)),
                                 rawCRC: UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
    }
}

/// Cumulative acknowledgements: for each stream, every chunk below `nextSequence` has
/// been written to the destination QEMU. Payload: count (u32), then count x
/// (stream u32, nextSequence u64).
public struct AckMessage: Equatable, Sendable {
    public struct Entry: Equatable, Sendable {
        public var stream: UInt32
        public var nextSequence: UInt64
        public init(stream: UInt32, nextSequence: UInt64) {
            self.stream = stream
            self.nextSequence = nextSequence
        }
    }
    public var entries: [Entry]
    public init(entries: [Entry]) { self.entries = entries }

    public func encoded() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 4 + entries.count * 12)
        bytes.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: UInt32(entries.count).bigEndian, toByteOffset: 0, as: UInt32.self)
            for (i, e) in entries.enumerated() {
                raw.storeBytes(of: e.stream.bigEndian, toByteOffset: 4 + i * 12, as: UInt32.self)
                raw.storeBytes(of: e.nextSequence.bigEndian, toByteOffset: 8 + i * 12, as: UInt64.self)
            }
        }
        return bytes
    }

    public static func decode(_ payload: [UInt8]) throws(WireError) -> AckMessage {
        guard payload.count >= 4 else { throw .malformedMessage(.ack, "shorter than its count") }
        return try withBytes(payload) { raw throws(WireError) in
            let count = Int(UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self)))
            guard count <= 4096, payload.count == 4 + count * 12 else {
                throw .malformedMessage(.ack, "length \(payload.count) does not match \(count) entries")
            }
            var entries: [Entry] = []
            entries.reserveCapacity(count)
            for i in 0..<count {
                entries.append(Entry(
                    stream: UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 4 + i * 12, as: UInt32.self)),
                    nextSequence: UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8 + i * 12, as: UInt64.self))))
            }
            return AckMessage(entries: entries)
        }
    }
}

/// A piece of a boot file: SHA-256 of the whole file (32 bytes), offset (u64), bytes.
public struct FileChunkMessage: Equatable, Sendable {
    public static let headerByteCount = 40
    public static let maximumPieceByteCount = 1 << 20
    public var sha256: String
    public var offset: UInt64
    public var bytes: [UInt8]
    public init(sha256: String, offset: UInt64, bytes: [UInt8]) {
        self.sha256 = sha256
        self.offset = offset
        self.bytes = bytes
    }

    public func encoded() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.headerByteCount)
        Self.writeHeader(sha256: sha256, offset: offset, into: &out)
        out.append(contentsOf: bytes)
        return out
    }

    /// Writes the header (file hash, offset) into the first ``headerByteCount`` bytes of
    /// `payload`, for a sender that reads the piece's bytes in place behind it.
    public static func writeHeader(sha256: String, offset: UInt64, into payload: inout [UInt8]) {
        let hash = Hex.decode(sha256) ?? []
        precondition(hash.count == 32, "sha256 must be 32 bytes of hex")
        payload.replaceSubrange(0..<32, with: hash)
        withUnsafeBytes(of: offset.bigEndian) { payload.replaceSubrange(32..<40, with: $0) }
    }

    public static func decode(_ payload: [UInt8]) throws(WireError) -> FileChunkMessage {
        guard payload.count >= headerByteCount else { throw .malformedMessage(.file, "shorter than its header") }
        let offset = payload.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 32, as: UInt64.self)) }
        return FileChunkMessage(sha256: Hex.encode(payload[0..<32]), offset: offset,
                                bytes: Array(payload[headerByteCount...]))
    }
}

/// Proof that a data connection belongs to a session, as SMB 3 signs session binding:
/// an HMAC over the session id and channel index under a key only the two control
/// endpoints know. A connection that only knows the session id cannot bind.
public enum ChannelBinding {
    /// The proofs' labels: the source's `bind`, the destination's `bound` answer.
    public enum Role: String, Sendable { case bind = "ferry-bind-v1", bound = "ferry-bound-v1" }

    public static func proof(bindKey: [UInt8], session: String, channel: UInt32, role: Role = .bind) -> String {
        var message = Array(role.rawValue.utf8)
        message.append(contentsOf: Array(session.utf8))
        withUnsafeBytes(of: channel.bigEndian) { message.append(contentsOf: $0) }
        let mac = HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: bindKey))
        return Hex.encode(Array(mac))
    }

    /// Constant-time check of a proof.
    public static func verify(proof: String, bindKey: [UInt8], session: String, channel: UInt32, role: Role = .bind) -> Bool {
        Handshake.equal(self.proof(bindKey: bindKey, session: session, channel: channel, role: role), proof)
    }
}

public enum Hex {
    public static func encode(_ bytes: some Collection<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 2 == 0 else { return nil }
        func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: c - 48
            case 97...102: c - 87
            case 65...70: c - 55
            default: nil
            }
        }
        var out = [UInt8]()
        out.reserveCapacity(chars.count / 2)
        var i = 0
        while i < chars.count {
            guard let hi = nibble(chars[i]), let lo = nibble(chars[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    public static func random(byteCount: Int) -> String {
        var g = SystemRandomNumberGenerator()
        return encode((0..<byteCount).map { _ in UInt8.random(in: 0...255, using: &g) })
    }
}
