import CFerryLinux

/// The Ferry wire protocol: every byte Ferry sends between hosts travels in a frame.
///
/// ```
///  0        4    5    6         8            12           16           20
///  +--------+----+----+---------+------------+------------+------------+---------...
///  | magic  |ver |type|  flags  |   length   | payloadCRC | headerCRC  | payload
///  +--------+----+----+---------+------------+------------+------------+---------...
/// ```
///
/// All integers are big-endian. `magic` is "FERY". `ver` is the frame format version
/// (``FrameHeader/formatVersion``); the protocol version proper is negotiated in the
/// hello exchange. `payloadCRC` is CRC32C of the payload (0 for an empty payload),
/// `headerCRC` is CRC32C of bytes 0..<16, so a corrupted length is caught before the
/// decoder trusts it. See docs/PROTOCOL.md.
public struct FrameHeader: Equatable, Sendable {
    public static let magic: UInt32 = 0x4645_5259  // "FERY"
    public static let formatVersion: UInt8 = 1
    public static let byteCount = 20
    /// The largest payload a peer may send. A data chunk is at most
    /// ``ChunkPolicy/maximumChunkByteCount`` (1 MiB) plus its sub-header; control
    /// messages are small JSON documents; boot files travel in pieces of 1 MiB.
    /// 4 MiB leaves room for all of these and bounds what garbage can make us allocate.
    public static let maximumPayloadByteCount = 4 << 20

    public var type: FrameType
    public var flags: FrameFlags
    public var length: UInt32
    public var payloadCRC: UInt32

    public init(type: FrameType, flags: FrameFlags = [], length: UInt32, payloadCRC: UInt32) {
        self.type = type
        self.flags = flags
        self.length = length
        self.payloadCRC = payloadCRC
    }

    /// Writes the 20 header bytes into `buffer` (which must hold at least 20 bytes).
    public func write(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.byteCount)
        buffer.storeBytes(of: Self.magic.bigEndian, toByteOffset: 0, as: UInt32.self)
        buffer[4] = Self.formatVersion
        buffer[5] = type.rawValue
        buffer.storeBytes(of: flags.rawValue.bigEndian, toByteOffset: 6, as: UInt16.self)
        buffer.storeBytes(of: length.bigEndian, toByteOffset: 8, as: UInt32.self)
        buffer.storeBytes(of: payloadCRC.bigEndian, toByteOffset: 12, as: UInt32.self)
        let crc = ferry_crc32c(0, buffer.baseAddress, 16)
        buffer.storeBytes(of: crc.bigEndian, toByteOffset: 16, as: UInt32.self)
    }

    public func encoded() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.byteCount)
        bytes.withUnsafeMutableBytes { write(into: $0) }
        return bytes
    }

    /// Parses and checks a header: magic, format version, header CRC, frame type, length.
    public static func parse(_ raw: UnsafeRawBufferPointer) throws(WireError) -> FrameHeader {
        precondition(raw.count >= byteCount)
        let magic = UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        guard magic == Self.magic else { throw .badMagic(magic) }
        let version = raw[4]
        let crc = UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
        guard ferry_crc32c(0, raw.baseAddress, 16) == crc else { throw .headerChecksumMismatch }
        guard version == formatVersion else { throw .unsupportedFormatVersion(version) }
        guard let type = FrameType(rawValue: raw[5]), type != .invalid else { throw .unknownFrameType(raw[5]) }
        let flags = FrameFlags(rawValue: UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 6, as: UInt16.self)))
        let length = UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        guard length <= maximumPayloadByteCount else { throw .frameTooLarge(Int(length)) }
        let payloadCRC = UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
        return FrameHeader(type: type, flags: flags, length: length, payloadCRC: payloadCRC)
    }
}

/// Frame types. 0 is reserved as invalid; numbers are never reused.
public enum FrameType: UInt8, Sendable, CaseIterable {
    case invalid = 0
    /// Control connection, source to destination, first frame: versions and identity.
    case hello = 1
    /// Destination's answer to `hello`: chosen version.
    case welcome = 2
    /// Either side: a failure, with a code and a message. The sender closes afterwards.
    case error = 3
    /// Source: the VM to migrate (spec, boot files, streams).
    case offer = 4
    /// Destination: offer accepted, session id, missing boot files, its NICs and data port.
    case accept = 5
    /// Source: a piece of a boot file the destination lacks.
    case file = 6
    /// Destination: boot files complete, destination QEMU waiting for the streams.
    case ready = 7
    /// Data connection, first frame: joins a session with proof that it belongs.
    case bind = 8
    /// Destination: the data channel is bound.
    case bound = 9
    /// Source: a QEMU stream has opened (ordered: stream ids count up from 0).
    case streamOpen = 10
    /// Source, data channels: a chunk of a stream.
    case data = 11
    /// Destination, data channels: cumulative acknowledgements per stream.
    case ack = 12
    /// Source: a stream has ended after this many chunks and bytes.
    case streamEnd = 13
    /// Destination: QEMU has loaded the whole VM and waits paused.
    case loaded = 14
    /// Source: the source QEMU is stopped for good; run the VM on the destination.
    case commit = 15
    /// Destination: the VM runs on the destination.
    case committed = 16
    /// Source: give up; the VM stays on the source. Destination discards everything.
    case abort = 17
    /// Either side: progress or keep-alive, no reply expected.
    case status = 18
    /// Destination: a bandwidth limit for this migration (the host's share).
    case limit = 19
    /// Source, after `welcome`: its proof of the cluster key over the exchange.
    case auth = 20
    /// Either direction, on its own authenticated control connection, instead of `offer`:
    /// settles a switchover left unsettled by a crash (``ResolveMessage``).
    case resolve = 21
    /// The answer to `resolve` (``ResolvedMessage``).
    case resolved = 22
    /// Protocol v2. Source, first frame of a new connection: the session's control
    /// connection continues here (``RejoinMessage``), on another NIC when its own failed.
    case rejoin = 23
    /// Protocol v2. Destination: the control connection continues on this connection.
    case rejoined = 24
    /// Protocol v2, either side on the control connection: how many control frames it has
    /// received; also the control connection's heartbeat (``ReceivedMessage``).
    case received = 25
    /// Protocol v5. Source, first frame after the handshake: not a migration, a question
    /// about the host (``HostQueryMessage``), as `ferry drain` asks before it places VMs.
    case hostQuery = 26
    /// Protocol v5. Destination: the answer to `hostQuery` (``HostInfoMessage``).
    case hostInfo = 27
    /// Protocol v6. Destination, after a postcopy commit: every page is here
    /// (``PostcopyDoneMessage``).
    case postcopyDone = 28
    /// Protocol v8. Source, instead of `offer`: a libvirt domain whose migration libvirt
    /// runs and Ferry carries (``LibvirtOfferMessage``).
    case libvirtOffer = 29
}

/// Frame flags. Bits not defined here must be zero; a receiver refuses unknown bits.
public struct FrameFlags: OptionSet, Sendable, Equatable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// The payload is sealed with AES-256-GCM (ciphertext, then a 16-byte tag; a data
    /// frame's sub-header stays clear and is authenticated). See ``FrameSeal``.
    public static let sealed = FrameFlags(rawValue: 1 << 0)
    /// A `data` frame's bytes are compressed: a ``CompressionHeader`` follows the chunk
    /// sub-header.
    public static let compressed = FrameFlags(rawValue: 1 << 1)
    /// A `data` frame whose `payloadCRC` is 0 and not checked: the sender spliced the
    /// bytes from QEMU's socket to the data channel without seeing them (the zero-copy
    /// path), so TCP's checksum is their only check. Only on unsealed connections, never
    /// with `compressed`.
    public static let unchecked = FrameFlags(rawValue: 1 << 2)
    public static let known: FrameFlags = [.sealed, .compressed, .unchecked]
}

/// A whole frame: header fields and payload bytes.
public struct Frame: Equatable, Sendable {
    public var type: FrameType
    public var flags: FrameFlags
    public var payload: [UInt8]

    public init(type: FrameType, flags: FrameFlags = [], payload: [UInt8] = []) {
        self.type = type
        self.flags = flags
        self.payload = payload
    }

    /// Header and payload, ready for the wire.
    public func encoded() -> [UInt8] {
        precondition(payload.count <= FrameHeader.maximumPayloadByteCount, "frame payload too large")
        let header = FrameHeader(type: type, flags: flags, length: UInt32(payload.count),
                                 payloadCRC: CRC32C.checksum(payload))
        return header.encoded() + payload
    }
}

/// Errors found while decoding frames and messages. Each says what was wrong with the bytes.
public enum WireError: Error, Equatable, Sendable, CustomStringConvertible {
    case badMagic(UInt32)
    case unsupportedFormatVersion(UInt8)
    case headerChecksumMismatch
    case payloadChecksumMismatch
    case unknownFrameType(UInt8)
    case unknownFlags(UInt16)
    case frameTooLarge(Int)
    case truncated(expected: Int, got: Int)
    case malformedMessage(FrameType, String)
    case unexpectedFrame(FrameType, expected: String)

    public var description: String {
        switch self {
        case .badMagic(let m):
            let hex = String(m, radix: 16)
            return "not a Ferry peer (bad magic 0x\(hex))"
        case .unsupportedFormatVersion(let v): return "unsupported frame format version \(v)"
        case .headerChecksumMismatch: return "frame header checksum mismatch (corrupted or not Ferry)"
        case .payloadChecksumMismatch: return "frame payload checksum mismatch (corrupted data)"
        case .unknownFrameType(let t): return "unknown frame type \(t)"
        case .unknownFlags(let f): return "unknown frame flags 0x\(String(f, radix: 16))"
        case .frameTooLarge(let n): return "frame of \(n) bytes exceeds the limit of \(FrameHeader.maximumPayloadByteCount)"
        case .truncated(let e, let g): return "truncated frame: expected \(e) bytes, got \(g)"
        case .malformedMessage(let t, let why): return "malformed \(t) message: \(why)"
        case .unexpectedFrame(let t, let e): return "unexpected \(t) frame (expected \(e))"
        }
    }
}

/// CRC32C (Castagnoli), hardware-accelerated where the CPU has SSE4.2.
public enum CRC32C {
    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0) }
    }
    public static func checksum(_ raw: UnsafeRawBufferPointer) -> UInt32 {
        raw.count == 0 ? 0 : ferry_crc32c(0, raw.baseAddress, raw.count)
    }
    public static func update(_ crc: UInt32, _ raw: UnsafeRawBufferPointer) -> UInt32 {
        raw.count == 0 ? crc : ferry_crc32c(crc, raw.baseAddress, raw.count)
    }
}

/// Incremental frame decoder: feed it bytes in any split, take whole, checked frames out.
///
/// Used where bytes arrive in arbitrary pieces (tests, fuzzing, non-blocking readers);
/// the blocking channel readers parse header and payload directly with the same checks.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    private var readIndex = 0

    public init() {}

    public mutating func feed(_ bytes: some Sequence<UInt8>) {
        buffer.append(contentsOf: bytes)
    }

    /// Bytes received but not yet returned as frames.
    public var bufferedByteCount: Int { buffer.count - readIndex }

    /// The next whole frame, nil if more bytes are needed; throws on bytes that cannot be a frame.
    public mutating func next() throws(WireError) -> Frame? {
        guard buffer.count - readIndex >= FrameHeader.byteCount else { return nil }
        let start = readIndex
        let header = try withBytes(buffer) { raw throws(WireError) in
            try FrameHeader.parse(UnsafeRawBufferPointer(rebasing: raw[start..<start + FrameHeader.byteCount]))
        }
        guard header.flags.isSubset(of: .known) else { throw .unknownFlags(header.flags.rawValue) }
        let total = FrameHeader.byteCount + Int(header.length)
        guard buffer.count - readIndex >= total else { return nil }
        let payload = Array(buffer[(readIndex + FrameHeader.byteCount)..<(readIndex + total)])
        guard CRC32C.checksum(payload) == header.payloadCRC else { throw .payloadChecksumMismatch }
        readIndex += total
        if readIndex > 1 << 16 && readIndex * 2 > buffer.count {
            buffer.removeFirst(readIndex)
            readIndex = 0
        }
        return Frame(type: header.type, flags: header.flags, payload: payload)
    }
}

/// `withUnsafeBytes` for code that throws ``WireError`` (the standard library's closure
/// form does not carry typed errors through).
@inlinable
func withBytes<T>(_ bytes: [UInt8], _ body: (UnsafeRawBufferPointer) throws(WireError) -> T) throws(WireError) -> T {
    let result: Result<T, WireError> = bytes.withUnsafeBytes { raw in
        Result { () throws(WireError) -> T in try body(raw) }
    }
    return try result.get()
}
