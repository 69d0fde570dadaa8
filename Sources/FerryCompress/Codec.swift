/// A compression codec for chunks.
///
/// Each chunk is compressed on its own (no dictionary or history shared between chunks),
/// so chunks can be striped over channels, sent again after a failover and decompressed
/// in any order.
public enum Codec: Sendable, Hashable, CustomStringConvertible {
    /// LZ4 block format (`LZ4_compress_default`): the fastest, a lower ratio.
    case lz4
    /// A single Zstandard frame with its content size in the header. The level matters to
    /// the compressor only; any level decompresses with the same code.
    case zstd(level: Int32)

    /// The zstd levels a user may ask for. Levels above 19 ("ultra") need a window larger
    /// than a chunk, which gains nothing on 256 KiB chunks; negative ("fast") levels are
    /// left out until a measurement shows they beat LZ4 here.
    public static let zstdLevels: ClosedRange<Int32> = 1...19

    /// The level of plain `zstd`. Level 1, by measurement on 256 KiB chunks (see
    /// `CompressionAdvisor.Tuning.candidates`): level 3 gains 7% of ratio on heap-like
    /// data (2.49 against 2.32), 4% on text (3.90 against 3.75) and nothing on a real
    /// Python heap (6.66 against 6.72), for 1.3 to 1.6 times the CPU (216 against 346
    /// MB/s per core on heap-like data); level 2 gains 4-5% for 1.25 times. With 2 cores,
    /// level 1 keeps up with about 0.7 GB/s (5.5 Gbit/s) of heap-like guest data,
    /// level 3 with 0.43 GB/s.
    public static let defaultZstdLevel: Int32 = 1

    /// The codec's number on the wire. 0 is reserved as invalid.
    public var wireID: UInt8 {
        switch self {
        case .lz4: return 1
        case .zstd: return 2
        }
    }

    /// The codec with this wire number, nil for 0 or an unknown number. `level` is the
    /// zstd level (ignored for LZ4); the decompressor does not need it, so a receiver may
    /// pass the default.
    public init?(wireID: UInt8, level: Int32 = Codec.defaultZstdLevel) {
        switch wireID {
        case 1: self = .lz4
        case 2: self = .zstd(level: level)
        default: return nil
        }
    }

    /// `lz4`, `zstd:3`: the form `CompressionMode(parsing:)` accepts.
    public var description: String {
        switch self {
        case .lz4: return "lz4"
        case .zstd(let level): return "zstd:\(level)"
        }
    }
}

/// What the user asked for with `--compress`.
public enum CompressionMode: Sendable, Equatable, CustomStringConvertible {
    /// The `CompressionAdvisor` chooses, and keeps choosing as the data and the links change.
    case auto
    /// Never compress.
    case none
    /// Always this codec (chunks that do not shrink still go uncompressed).
    case fixed(Codec)

    /// Parses `auto`, `none`, `lz4`, `zstd` (level `Codec.defaultZstdLevel`) or
    /// `zstd:LEVEL` with LEVEL in `Codec.zstdLevels`. Nothing else: no spaces, no
    /// upper case, no sign on the level.
    public init(parsing text: String) throws(CompressionError) {
        switch text {
        case "auto": self = .auto
        case "none": self = .none
        case "lz4": self = .fixed(.lz4)
        case "zstd": self = .fixed(.zstd(level: Codec.defaultZstdLevel))
        default:
            let expected = "expected auto, none, lz4, zstd or zstd:LEVEL"
            guard text.hasPrefix("zstd:") else {
                if text.hasPrefix("lz4:") {
                    throw .invalidMode(text, reason: "lz4 takes no level; \(expected)")
                }
                throw .invalidMode(text, reason: "unknown compression; \(expected)")
            }
            let levelText = text.dropFirst("zstd:".count)
            let range = Codec.zstdLevels
            guard let first = levelText.first, first != "0", levelText.count <= 2,
                  levelText.allSatisfy({ $0.isASCII && $0.isNumber }),
                  let level = Int32(levelText), range.contains(level) else {
                throw .invalidMode(text, reason: "the zstd level must be a whole number from \(range.lowerBound) to \(range.upperBound)")
            }
            self = .fixed(.zstd(level: level))
        }
    }

    /// `auto`, `none`, `lz4`, `zstd:3`: parses back to the same mode.
    public var description: String {
        switch self {
        case .auto: return "auto"
        case .none: return "none"
        case .fixed(let codec): return codec.description
        }
    }
}

/// Why compressing, decompressing or choosing a codec failed.
public enum CompressionError: Error, CustomStringConvertible, Sendable, Equatable {
    /// A `--compress` value that is not one of the accepted forms.
    case invalidMode(String, reason: String)
    /// A wire codec number that is 0 or unknown.
    case unknownCodec(wireID: UInt8)
    /// The compressed bytes are not valid for the codec (corrupted, truncated, or more
    /// than one frame); `detail` is the library's own message where it has one.
    case malformed(Codec, compressedByteCount: Int, detail: String)
    /// The bytes decompressed (or, for zstd, the size the frame declares) are not the
    /// number the chunk's header announced.
    case wrongSize(Codec, expectedByteCount: Int, actualByteCount: Int)
    /// The destination buffer cannot hold the announced size.
    case outputTooSmall(Codec, expectedByteCount: Int, capacity: Int)

    public var description: String {
        switch self {
        case .invalidMode(let text, let reason):
            return "invalid compression '\(text)': \(reason)"
        case .unknownCodec(let id):
            return "unknown compression codec \(id) on the wire"
        case .malformed(let codec, let count, let detail):
            return "decompressing \(count) bytes of \(codec) failed: \(detail)"
        case .wrongSize(let codec, let expected, let actual):
            return "decompressing \(codec) gave \(actual) bytes where the chunk announced \(expected)"
        case .outputTooSmall(let codec, let expected, let capacity):
            return "cannot decompress \(expected) bytes of \(codec) into a buffer of \(capacity)"
        }
    }
}
