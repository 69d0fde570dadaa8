import Testing
@testable import FerryWire

@Suite("Frame codec")
struct FrameTests {
    let frames = [
        Frame(type: .hello, payload: Array(#"{"a":1}"#.utf8)),
        Frame(type: .data, payload: (0..<70_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }),
        Frame(type: .ack, payload: []),
        Frame(type: .error, flags: [], payload: Array("x".utf8)),
    ]

    var wire: [UInt8] { frames.flatMap { $0.encoded() } }

    @Test("round trip, all bytes at once")
    func allAtOnce() throws {
        var decoder = FrameDecoder()
        decoder.feed(wire)
        var out: [Frame] = []
        while let f = try decoder.next() { out.append(f) }
        #expect(out == frames)
        #expect(decoder.bufferedByteCount == 0)
    }

    @Test("round trip, one byte at a time")
    func oneByteAtATime() throws {
        var decoder = FrameDecoder()
        var out: [Frame] = []
        for byte in wire {
            decoder.feed([byte])
            while let f = try decoder.next() { out.append(f) }
        }
        #expect(out == frames)
    }

    @Test("round trip, odd splits", arguments: [3, 7, 19, 20, 21, 4093, 65537])
    func oddSplits(step: Int) throws {
        var decoder = FrameDecoder()
        var out: [Frame] = []
        var i = 0
        let bytes = wire
        while i < bytes.count {
            decoder.feed(bytes[i..<min(i + step, bytes.count)])
            while let f = try decoder.next() { out.append(f) }
            i += step
        }
        #expect(out == frames)
    }

    @Test("a partial frame waits for more bytes")
    func partial() throws {
        var decoder = FrameDecoder()
        let bytes = frames[1].encoded()
        decoder.feed(bytes.dropLast())
        #expect(try decoder.next() == nil)
        decoder.feed(bytes.suffix(1))
        #expect(try decoder.next() == frames[1])
    }

    @Test("bad magic is refused")
    func badMagic() {
        var decoder = FrameDecoder()
        decoder.feed(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        #expect(throws: WireError.badMagic(0x4745_5420)) { try decoder.next() }
    }

    @Test("a corrupted header is refused before its length is trusted")
    func badHeaderCRC() {
        var bytes = frames[0].encoded()
        bytes[9] ^= 0x40  // length field
        var decoder = FrameDecoder()
        decoder.feed(bytes)
        #expect(throws: WireError.headerChecksumMismatch) { try decoder.next() }
    }

    @Test("a corrupted payload is refused")
    func badPayloadCRC() {
        var bytes = frames[1].encoded()
        bytes[FrameHeader.byteCount + 1000] ^= 1
        var decoder = FrameDecoder()
        decoder.feed(bytes)
        #expect(throws: WireError.payloadChecksumMismatch) { try decoder.next() }
    }

    @Test("an unknown format version is refused")
    func badVersion() {
        var bytes = frames[0].encoded()
        bytes[4] = 9
        Self.reseal(&bytes)
        var decoder = FrameDecoder()
        decoder.feed(bytes)
        #expect(throws: WireError.unsupportedFormatVersion(9)) { try decoder.next() }
    }

    @Test("type 0 and unknown types are refused", arguments: [UInt8(0), 200])
    func badType(type: UInt8) {
        var bytes = frames[0].encoded()
        bytes[5] = type
        Self.reseal(&bytes)
        var decoder = FrameDecoder()
        decoder.feed(bytes)
        #expect(throws: WireError.unknownFrameType(type)) { try decoder.next() }
    }

    @Test("unknown flag bits are refused")
    func badFlags() {
        var bytes = frames[0].encoded()
        bytes[7] = 0x80
        Self.reseal(&bytes)
        var decoder = FrameDecoder()
        decoder.feed(bytes)
        #expect(throws: WireError.unknownFlags(0x80)) { try decoder.next() }
    }

    @Test("an oversized length is refused without allocating")
    func tooLarge() {
        var bytes = frames[0].encoded()
        let huge = UInt32(FrameHeader.maximumPayloadByteCount + 1)
        bytes[8] = UInt8(huge >> 24); bytes[9] = UInt8((huge >> 16) & 0xff)
        bytes[10] = UInt8((huge >> 8) & 0xff); bytes[11] = UInt8(huge & 0xff)
        Self.reseal(&bytes)
        var decoder = FrameDecoder()
        decoder.feed(bytes)
        #expect(throws: WireError.frameTooLarge(Int(huge))) { try decoder.next() }
    }

    @Test("CRC32C matches the standard check value")
    func crcCheckValue() {
        // The CRC-32C of "123456789" is 0xE3069283 (RFC 3720, appendix B.4).
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        let long = (0..<100_003).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let whole = CRC32C.checksum(long)
        let parts = long.withUnsafeBytes { raw in
            CRC32C.update(CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[0..<40_001])),
                          UnsafeRawBufferPointer(rebasing: raw[40_001...]))
        }
        #expect(whole == parts)
    }

    /// Recomputes the header CRC after a test changed a header field.
    static func reseal(_ bytes: inout [UInt8]) {
        let crc = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<16])) }
        bytes[16] = UInt8(crc >> 24); bytes[17] = UInt8((crc >> 16) & 0xff)
        bytes[18] = UInt8((crc >> 8) & 0xff); bytes[19] = UInt8(crc & 0xff)
    }
}
