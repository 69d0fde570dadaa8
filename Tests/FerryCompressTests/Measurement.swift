#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import FerryCompress

/// Speed and ratio of each codec on 256 KiB chunks, printed (not checked): the figures
/// behind `CompressionAdvisor.Tuning.candidates` and `Codec.defaultZstdLevel`.
///
///     FERRY_COMPRESS_MEASURE=1 swift test --skip-build --filter CompressionMeasurement
///
/// `FERRY_COMPRESS_SAMPLE=FILE` adds the 256 KiB chunks of FILE (say, a process's heap).
@Suite("Compression measurement", .enabled(if: getenv("FERRY_COMPRESS_MEASURE") != nil))
struct CompressionMeasurement {
    static let chunkByteCount = 256 << 10

    static func threadCPUNanoseconds() -> Int {
        var t = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
        return t.tv_sec * 1_000_000_000 + t.tv_nsec
    }

    static func corpora() -> [(String, [[UInt8]])] {
        var out: [(String, [[UInt8]])] = TestData.allCases.filter { $0 != .zeros }.map { kind in
            (kind.description, (0..<32).map { kind.bytes(chunkByteCount, seed: UInt64($0)) })
        }
        if let path = getenv("FERRY_COMPRESS_SAMPLE"), let file = fopen(path, "rb") {
            defer { fclose(file) }
            // QEMU sends a page of zeros as a flag, not as data: leave such pages out.
            var stream: [UInt8] = []
            var page = [UInt8](repeating: 0, count: 4096)
            while stream.count < 256 * chunkByteCount,
                  page.withUnsafeMutableBytes({ fread($0.baseAddress, 1, 4096, file) }) == 4096 {
                if page.contains(where: { $0 != 0 }) { stream += page }
            }
            let chunks = stride(from: 0, to: stream.count - chunkByteCount + 1, by: chunkByteCount).map {
                Array(stream[$0..<($0 + chunkByteCount)])
            }
            out.append(("sample", chunks))
        }
        return out
    }

    @Test("codecs on 256 KiB chunks")
    func measure() throws {
        let codecs: [Codec] = [.lz4, .zstd(level: -1), .zstd(level: 1), .zstd(level: 2), .zstd(level: 3)]
        let compressor = Compressor()
        let decompressor = Decompressor()
        var frame = [UInt8](repeating: 0, count: Self.chunkByteCount)
        var back = [UInt8](repeating: 0, count: Self.chunkByteCount)
        print("data    codec    ratio  shrank  compress MB/s/core  decompress MB/s/core")
        for (name, chunks) in Self.corpora() {
            for codec in codecs {
                var input = 0, output = 0, shrank = 0, cpu = 0, decompressCPU = 0, decompressed = 0
                // At least 0.5 CPU-seconds and two passes, so that caches are warm.
                var passes = 0
                while passes < 2 || cpu < 500_000_000 {
                    for chunk in chunks {
                        let start = Self.threadCPUNanoseconds()
                        let n = chunk.withUnsafeBytes { src in frame.withUnsafeMutableBytes { compressor.compress(codec, from: src, into: $0) } }
                        cpu += Self.threadCPUNanoseconds() - start
                        input += chunk.count
                        output += n ?? chunk.count
                        guard let n else { continue }
                        shrank += 1
                        let dStart = Self.threadCPUNanoseconds()
                        try frame.withUnsafeBytes { f in
                            try back.withUnsafeMutableBytes {
                                try decompressor.decompress(codec, from: UnsafeRawBufferPointer(rebasing: f[0..<n]), into: $0,
                                                            expectedByteCount: chunk.count)
                            }
                        }
                        decompressCPU += Self.threadCPUNanoseconds() - dStart
                        decompressed += chunk.count
                    }
                    passes += 1
                }
                let ratio = Double(input) / Double(output)
                let speed = Double(input) / Double(cpu) * 1e3
                let dSpeed = decompressCPU > 0 ? Double(decompressed) / Double(decompressCPU) * 1e3 : 0
                print("\(name.padding(7)) \(codec.description.padding(7)) \(fixed(ratio).padding(6)) \((String(shrank * 100 / (passes * chunks.count)) + "%").padding(7)) \(fixed(speed, 0).padding(19)) \(fixed(dSpeed, 0))")
            }
        }
    }
}

private func fixed(_ x: Double, _ decimals: Int = 2) -> String {
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let n = Int((x * scale).rounded())
    guard decimals > 0 else { return String(n) }
    let fraction = String(n % Int(scale))
    return "\(n / Int(scale)).\(String(repeating: "0", count: decimals - fraction.count))\(fraction)"
}

private extension String {
    func padding(_ width: Int) -> String { count >= width ? self + " " : self + String(repeating: " ", count: width - count) }
}
