import CFerryCompress

/// Compresses chunks. One per thread: it is not thread-safe.
///
/// It keeps one zstd compression context for its whole life, so that steady state
/// allocates nothing: zstd reuses the context's tables from call to call (it reallocates
/// only when a larger input or level needs larger ones). LZ4 keeps its 16 KiB of state
/// on the stack (`LZ4_compress_default`), so it needs nothing here.
public final class Compressor {
    private let zstdContext: OpaquePointer

    public init() {
        guard let context = ZSTD_createCCtx() else {
            fatalError("ZSTD_createCCtx failed: out of memory")
        }
        zstdContext = context
    }

    deinit {
        ZSTD_freeCCtx(zstdContext)
    }

    /// Compresses `src` into `dst` and returns the compressed byte count, or nil when the
    /// result would not be smaller than `src` or would not fit in `dst`: either way the
    /// chunk should go uncompressed. A `dst` of `src.count` bytes is therefore always
    /// large enough; a smaller one asks for at least that much shrinking.
    public func compress(_ codec: Codec, from src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer) -> Int? {
        // Room for one byte less than the input: anything that does not fit is no gain.
        compress(codec, from: src, into: dst, capacity: min(dst.count, src.count - 1))
    }

    /// Compresses into the first `capacity` bytes of `dst`, whatever the gain (tests make
    /// frames of empty and one-byte inputs with it).
    func compress(_ codec: Codec, from src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, capacity: Int) -> Int? {
        precondition(capacity <= dst.count, "capacity beyond the destination buffer")
        precondition(src.count <= Int(LZ4_MAX_INPUT_SIZE), "a chunk of \(src.count) bytes is beyond what LZ4 takes")
        guard capacity > 0, let out = dst.baseAddress else { return nil }
        // The libraries take a valid pointer even for an empty input.
        let input = src.baseAddress ?? UnsafeRawPointer(out)
        switch codec {
        case .lz4:
            let n = LZ4_compress_default(input.assumingMemoryBound(to: CChar.self),
                                         out.assumingMemoryBound(to: CChar.self),
                                         Int32(src.count), Int32(min(capacity, Int(Int32.max))))
            return n > 0 ? Int(n) : nil
        case .zstd(let level):
            let n = ZSTD_compressCCtx(zstdContext, out, capacity, input, src.count, level)
            // The only error for valid arguments is "destination too small": no gain.
            return ZSTD_isError(n) != 0 ? nil : n
        }
    }

    /// The most bytes `codec` can produce from `byteCount` bytes (incompressible input).
    static func maximumCompressedByteCount(_ codec: Codec, inputByteCount byteCount: Int) -> Int {
        switch codec {
        case .lz4: return Int(LZ4_compressBound(Int32(byteCount)))
        case .zstd: return ZSTD_compressBound(byteCount)
        }
    }
}

/// Decompresses chunks. One per thread: it is not thread-safe.
///
/// Compressed bytes come from the network and are not trusted: the decoders used here
/// check every length against both buffers (`LZ4_decompress_safe`, zstd's single-shot
/// decoder), never write beyond `expectedByteCount` bytes of the destination, and the
/// result must be exactly the size the chunk's header announced.
///
/// Neither format checks its contents (LZ4 blocks have no checksum; zstd frames are made
/// without one): a damaged literal decodes to other bytes of the right size. Damage to
/// the structure is refused here; the contents are for the chunk's CRC32C to check, and
/// computed over the uncompressed bytes it also covers the codecs themselves.
public final class Decompressor {
    private let zstdContext: OpaquePointer
    /// A valid pointer for the libraries when a buffer is empty (and has no address).
    private let scratch: UnsafeMutableRawPointer

    public init() {
        guard let context = ZSTD_createDCtx() else {
            fatalError("ZSTD_createDCtx failed: out of memory")
        }
        zstdContext = context
        scratch = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
    }

    deinit {
        ZSTD_freeDCtx(zstdContext)
        scratch.deallocate()
    }

    /// Decompresses `src` into the first `expectedByteCount` bytes of `dst`. Throws when
    /// the input is corrupted or truncated, holds anything after its data, or decodes to
    /// any other size than `expectedByteCount`; `dst` beyond `expectedByteCount` is never
    /// written, and on a failure its first `expectedByteCount` bytes are undefined.
    public func decompress(_ codec: Codec, from src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer,
                           expectedByteCount: Int) throws(CompressionError) {
        precondition(expectedByteCount >= 0, "a negative expected size")
        guard expectedByteCount <= dst.count else {
            throw .outputTooSmall(codec, expectedByteCount: expectedByteCount, capacity: dst.count)
        }
        guard !src.isEmpty, let input = src.baseAddress else {
            throw .malformed(codec, compressedByteCount: 0, detail: "no compressed bytes")
        }
        let out = dst.baseAddress ?? scratch
        switch codec {
        case .lz4:
            guard src.count <= Int(Int32.max), expectedByteCount <= Int(Int32.max) else {
                throw .malformed(codec, compressedByteCount: src.count, detail: "larger than an LZ4 block can be")
            }
            let n = LZ4_decompress_safe(input.assumingMemoryBound(to: CChar.self), out.assumingMemoryBound(to: CChar.self),
                                        Int32(src.count), Int32(expectedByteCount))
            // Negative: malformed, truncated, or it would have written more than expected.
            guard n >= 0 else {
                throw .malformed(codec, compressedByteCount: src.count,
                                 detail: "invalid LZ4 block (corrupted, truncated, or longer than \(expectedByteCount) bytes)")
            }
            guard Int(n) == expectedByteCount else {
                throw .wrongSize(codec, expectedByteCount: expectedByteCount, actualByteCount: Int(n))
            }
        case .zstd:
            // Exactly one whole frame: nothing missing, nothing after it.
            let frameByteCount = ZSTD_findFrameCompressedSize(input, src.count)
            if ZSTD_isError(frameByteCount) != 0 {
                throw .malformed(codec, compressedByteCount: src.count, detail: Self.zstdMessage(frameByteCount))
            }
            guard frameByteCount == src.count else {
                throw .malformed(codec, compressedByteCount: src.count,
                                 detail: "\(src.count - frameByteCount) bytes after the zstd frame")
            }
            // The frame must declare its size, and declare the expected one.
            let declared = ZSTD_getFrameContentSize(input, src.count)
            guard declared != ZSTD_CONTENTSIZE_UNKNOWN, declared != ZSTD_CONTENTSIZE_ERROR else {
                throw .malformed(codec, compressedByteCount: src.count, detail: "the zstd frame does not declare its size")
            }
            guard declared == UInt64(expectedByteCount) else {
                throw .wrongSize(codec, expectedByteCount: expectedByteCount,
                                 actualByteCount: declared > UInt64(Int.max) ? Int.max : Int(declared))
            }
            let n = ZSTD_decompressDCtx(zstdContext, out, expectedByteCount, input, src.count)
            if ZSTD_isError(n) != 0 {
                throw .malformed(codec, compressedByteCount: src.count, detail: Self.zstdMessage(n))
            }
            guard n == expectedByteCount else {
                throw .wrongSize(codec, expectedByteCount: expectedByteCount, actualByteCount: n)
            }
        }
    }

    private static func zstdMessage(_ code: Int) -> String {
        guard let name = ZSTD_getErrorName(code) else { return "zstd error \(code)" }
        return String(cString: name)
    }
}
