import Testing
@testable import FerryCompress

let allCodecs: [Codec] = [.lz4, .zstd(level: 1), .zstd(level: 3), .zstd(level: 19)]

/// A destination buffer followed by guard bytes, to see that nothing writes past it.
final class GuardedBuffer {
    static let guardByteCount = 64
    static let guardByte: UInt8 = 0xA5
    let count: Int
    private var storage: [UInt8]

    init(count: Int) {
        self.count = count
        storage = [UInt8](repeating: Self.guardByte, count: count + Self.guardByteCount)
    }

    func withBuffer<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try storage.withUnsafeMutableBytes { try body(UnsafeMutableRawBufferPointer(rebasing: $0[0..<count])) }
    }

    var bytes: [UInt8] { Array(storage[0..<count]) }
    /// Whether the bytes from `offset` on (the guard, and any part of the buffer that
    /// must stay untouched) still hold the guard byte.
    func untouched(from offset: Int) -> Bool { storage[offset...].allSatisfy { $0 == Self.guardByte } }
}

func compressed(_ codec: Codec, _ data: [UInt8], compressor: Compressor = Compressor()) -> [UInt8]? {
    var out = [UInt8](repeating: 0, count: max(data.count, 1))
    let n = data.withUnsafeBytes { src in out.withUnsafeMutableBytes { compressor.compress(codec, from: src, into: $0) } }
    return n.map { Array(out[0..<$0]) }
}

/// Decompresses into a guarded buffer of `capacity` bytes; checks the guard either way.
func decompressed(_ codec: Codec, _ frame: [UInt8], expected: Int, capacity: Int? = nil,
                  decompressor: Decompressor = Decompressor()) throws(CompressionError) -> [UInt8] {
    let buffer = GuardedBuffer(count: capacity ?? expected)
    defer { #expect(buffer.untouched(from: min(expected, buffer.count)), "wrote past the expected size") }
    do {
        try buffer.withBuffer { dst in
            try frame.withUnsafeBytes { src in try decompressor.decompress(codec, from: src, into: dst, expectedByteCount: expected) }
        }
    } catch let e as CompressionError {
        throw e
    } catch {
        Issue.record("unexpected error \(error)")
    }
    return Array(buffer.bytes.prefix(expected))
}

@Suite("Codecs")
struct CodecTests {
    @Test("round trip", arguments: allCodecs, [0, 1, 4096, 256 << 10])
    func roundTrip(codec: Codec, size: Int) throws {
        let compressor = Compressor()
        let decompressor = Decompressor()
        for kind in TestData.allCases {
            let data = kind.bytes(size)
            let frame = compressed(codec, data, compressor: compressor)
            if size <= 1 || kind == .random {
                // Cannot shrink: the chunk goes uncompressed.
                #expect(frame == nil, "\(kind) \(size) bytes shrank with \(codec)")
                continue
            }
            let f = try #require(frame, "\(kind) \(size) bytes did not shrink with \(codec)")
            #expect(f.count < data.count)
            #expect(try decompressed(codec, f, expected: size, decompressor: decompressor) == data, "\(kind)")
        }
    }

    @Test("frames of empty and one-byte inputs decompress", arguments: allCodecs)
    func tinyFrames(codec: Codec) throws {
        for data in [[], [0x42]] as [[UInt8]] {
            var out = [UInt8](repeating: 0, count: 64)
            let n = try #require(data.withUnsafeBytes { src in
                out.withUnsafeMutableBytes { Compressor().compress(codec, from: src, into: $0, capacity: 64) }
            })
            #expect(try decompressed(codec, Array(out[0..<n]), expected: data.count) == data)
        }
    }

    @Test("one compressor and decompressor serve many chunks of every codec")
    func reuse() throws {
        let compressor = Compressor()
        let decompressor = Decompressor()
        for round in 0..<3 {
            for codec in allCodecs {
                let data = TestData.mixed.bytes(64 << 10, seed: UInt64(round))
                let f = try #require(compressed(codec, data, compressor: compressor))
                #expect(try decompressed(codec, f, expected: data.count, decompressor: decompressor) == data)
            }
        }
    }

    @Test("a destination smaller than the input asks for that much shrinking", arguments: allCodecs)
    func smallDestination(codec: Codec) throws {
        let data = TestData.text.bytes(256 << 10)
        let size = try #require(compressed(codec, data)).count
        let compressor = Compressor()
        // zstd needs a little slack beyond its result: with less room it gives up (nil),
        // or stores a block uncompressed; LZ4 fits exactly.
        for capacity in [size + 64, size, size - 1, size / 2, 1] {
            let buffer = GuardedBuffer(count: capacity)
            let n = data.withUnsafeBytes { src in buffer.withBuffer { compressor.compress(codec, from: src, into: $0) } }
            if capacity < size {
                #expect(n == nil, "fitted \(size) bytes into \(capacity)")
            } else if capacity > size || codec == .lz4 {
                #expect(n == size)
            }
            if let n { #expect(n <= capacity) }
            #expect(buffer.untouched(from: capacity))
        }
    }

    @Test("random data does not shrink, whatever the room", arguments: allCodecs)
    func randomDoesNotShrink(codec: Codec) {
        let data = TestData.random.bytes(256 << 10, seed: 7)
        let room = Compressor.maximumCompressedByteCount(codec, inputByteCount: data.count)
        var out = [UInt8](repeating: 0, count: room)
        let n = data.withUnsafeBytes { src in out.withUnsafeMutableBytes { Compressor().compress(codec, from: src, into: $0) } }
        #expect(n == nil)
    }

    @Test("truncated input is refused", arguments: allCodecs)
    func truncated(codec: Codec) throws {
        let data = TestData.heap.bytes(256 << 10)
        let f = try #require(compressed(codec, data))
        for length in [0, 1, 4, 9, f.count / 3, f.count / 2, f.count - 8, f.count - 1] {
            #expect(throws: CompressionError.self, "\(length) of \(f.count) bytes") {
                _ = try decompressed(codec, Array(f.prefix(length)), expected: data.count)
            }
        }
    }

    @Test("bytes after the compressed data are refused", arguments: allCodecs)
    func trailingBytes(codec: Codec) throws {
        let data = TestData.heap.bytes(4096)
        let f = try #require(compressed(codec, data))
        for extra in [[0], [0, 0, 0, 0], f] as [[UInt8]] {
            #expect(throws: CompressionError.self) { _ = try decompressed(codec, f + extra, expected: data.count) }
        }
    }

    @Test("a wrong expected size is refused, without writing past it", arguments: allCodecs)
    func wrongSize(codec: Codec) throws {
        let data = TestData.text.bytes(256 << 10)
        let f = try #require(compressed(codec, data))
        for expected in [0, 1, data.count / 2, data.count - 1, data.count + 1, 2 * data.count] {
            // The destination is large enough for all the data, so only the size check stops it.
            #expect(throws: CompressionError.self, "expected \(expected)") {
                _ = try decompressed(codec, f, expected: expected, capacity: 2 * data.count + 1)
            }
        }
        let error = #expect(throws: CompressionError.self) { _ = try decompressed(codec, f, expected: data.count + 1) }
        #expect(error?.description.contains("\(codec)") == true)
    }

    @Test("a destination too small for the expected size is refused")
    func destinationTooSmall() throws {
        let data = TestData.text.bytes(4096)
        let f = try #require(compressed(.lz4, data))
        let error = #expect(throws: CompressionError.self) {
            _ = try decompressed(.lz4, f, expected: data.count, capacity: data.count - 1)
        }
        #expect(error == .outputTooSmall(.lz4, expectedByteCount: 4096, capacity: 4095))
    }

    /// Neither format has a checksum of its contents: a flipped literal decodes to other
    /// bytes of the right size (the frame's CRC over the uncompressed bytes catches that).
    /// What must hold: structure damage is refused, and nothing is ever written past the
    /// expected size.
    @Test("corrupted input is refused or decodes to the expected size, never beyond", arguments: allCodecs)
    func corrupted(codec: Codec) throws {
        let decompressor = Decompressor()
        for kind in [TestData.heap, .text, .mixed] {
            let data = kind.bytes(256 << 10)
            let f = try #require(compressed(codec, data))
            var refused = 0
            var rng = SplitMix64(seed: 99)
            let positions = [0, 1, 2, 3, 4, 5, 6, 7, f.count / 2, f.count - 2, f.count - 1]
                + (0..<60).map { _ in Int(rng.next() % UInt64(f.count)) }
            for position in positions {
                for flip: UInt8 in [0xFF, 0x01, 0x80] {
                    var bad = f
                    bad[position] ^= flip
                    do {
                        let out = try decompressed(codec, bad, expected: data.count, decompressor: decompressor)
                        #expect(out.count == data.count)
                    } catch {
                        refused += 1
                        #expect(!error.description.isEmpty)
                    }
                }
            }
            #expect(refused > 0, "\(kind): no flip was refused")
        }
        // Structure damage: the second half all 0xFF (huge lengths, offsets, bad tables).
        let data = TestData.heap.bytes(256 << 10)
        var bad = try #require(compressed(codec, data))
        for i in (bad.count / 2)..<bad.count { bad[i] = 0xFF }
        #expect(throws: CompressionError.self) { _ = try decompressed(codec, bad, expected: data.count) }
    }

    @Test("a damaged zstd header is refused")
    func zstdHeader() throws {
        let data = TestData.heap.bytes(4096)
        let f = try #require(compressed(.zstd(level: 1), data))
        for position in 0..<4 {  // the magic number
            var bad = f
            bad[position] ^= 0x10
            let error = #expect(throws: CompressionError.self) { _ = try decompressed(.zstd(level: 1), bad, expected: data.count) }
            #expect(error?.description.contains("zstd") == true)
        }
    }

    @Test("wire ids: 0 is invalid, lz4 1, zstd 2")
    func wireIDs() {
        #expect(Codec.lz4.wireID == 1)
        #expect(Codec.zstd(level: 7).wireID == 2)
        #expect(Codec(wireID: 0) == nil)
        #expect(Codec(wireID: 3) == nil)
        #expect(Codec(wireID: 1) == .lz4)
        #expect(Codec(wireID: 2, level: 5) == .zstd(level: 5))
        #expect(Codec.zstd(level: 3).description == "zstd:3")
        #expect(Codec.lz4.description == "lz4")
    }
}

@Suite("Compression mode")
struct CompressionModeTests {
    @Test("accepted forms")
    func valid() throws {
        #expect(try CompressionMode(parsing: "auto") == .auto)
        #expect(try CompressionMode(parsing: "none") == .none)
        #expect(try CompressionMode(parsing: "lz4") == .fixed(.lz4))
        #expect(try CompressionMode(parsing: "zstd") == .fixed(.zstd(level: Codec.defaultZstdLevel)))
        #expect(try CompressionMode(parsing: "zstd:1") == .fixed(.zstd(level: 1)))
        #expect(try CompressionMode(parsing: "zstd:19") == .fixed(.zstd(level: 19)))
        for mode: CompressionMode in [.auto, .none, .fixed(.lz4), .fixed(.zstd(level: 3))] {
            #expect(try CompressionMode(parsing: mode.description) == mode)
        }
    }

    @Test("refused forms", arguments: ["", "Auto", "LZ4", " lz4", "lz4 ", "zstd:", "zstd:0", "zstd:20", "zstd:-1",
                                       "zstd:+3", "zstd:3.0", "zstd:abc", "zstd:0003", "zstd:٣", "zstd3", "lz4:1",
                                       "gzip", "none,lz4"])
    func invalid(text: String) {
        let error = #expect(throws: CompressionError.self) { try CompressionMode(parsing: text) }
        guard case .invalidMode(let echoed, let reason)? = error else {
            Issue.record("not an invalid mode: \(String(describing: error))")
            return
        }
        #expect(echoed == text)
        #expect(error?.description.contains("'\(text)'") == true)
        if text.hasPrefix("zstd:") {
            #expect(reason.contains("1 to 19"))
        } else {
            #expect(reason.contains("auto, none, lz4, zstd or zstd:LEVEL"))
        }
    }
}
