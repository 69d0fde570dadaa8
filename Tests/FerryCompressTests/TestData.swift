/// Deterministic test data: the kinds of bytes a guest's memory holds.
enum TestData: String, CaseIterable, Sendable, CustomStringConvertible {
    /// Random bytes: encrypted or already compressed data, which nothing shrinks.
    case random
    case zeros
    /// Lines of logs, JSON and headers, as a server's buffers hold them.
    case text
    /// A heap: allocator headers, pointers, small integers, strings, some random bytes
    /// (hashes, keys), some zeroed memory.
    case heap
    /// 4 KiB pages of the other kinds in turn, as a guest's RAM is laid out.
    case mixed

    var description: String { rawValue }

    func bytes(_ count: Int, seed: UInt64 = 1) -> [UInt8] {
        var rng = SplitMix64(seed: seed &+ UInt64(TestData.allCases.firstIndex(of: self)!) &* 0x1000)
        switch self {
        case .random: return TestData.random(count, &rng)
        case .zeros: return [UInt8](repeating: 0, count: count)
        case .text: return TestData.text(count, &rng)
        case .heap: return TestData.heap(count, &rng)
        case .mixed:
            var out: [UInt8] = []
            out.reserveCapacity(count)
            let kinds: [TestData] = [.heap, .text, .random, .heap, .zeros, .text]
            var page = 0
            while out.count < count {
                let n = min(4096, count - out.count)
                out += kinds[page % kinds.count].bytes(n, seed: seed &+ UInt64(page))
                page += 1
            }
            return out
        }
    }

    private static func random(_ count: Int, _ rng: inout SplitMix64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { p in
            var i = 0
            while i < count {
                var word = rng.next()
                let n = min(8, count - i)
                withUnsafeBytes(of: &word) { w in
                    for k in 0..<n { p[i + k] = w[k] }
                }
                i += n
            }
        }
        return out
    }

    private static let words = [
        "GET", "POST", "/api/v1/orders", "/api/v2/users", "/healthz", "HTTP/1.1", "200", "404", "500",
        "Content-Type:", "application/json", "text/html;", "charset=utf-8", "Accept-Encoding:", "gzip,",
        "user_id", "session", "token", "status", "ok", "error", "timeout", "retry", "customer", "invoice",
        "amount", "currency", "EUR", "USD", "created_at", "updated_at", "true", "false", "null", "name",
        "email", "example.com", "INFO", "WARN", "DEBUG", "worker", "request", "completed", "in", "ms",
        "the", "of", "and", "to", "connection", "pool", "cache", "hit", "miss", "key", "value", "shard",
    ]

    private static let levels = ["INFO", "INFO", "INFO", "WARN", "DEBUG", "ERROR"]

    private static func text(_ count: Int, _ rng: inout SplitMix64) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count + 256)
        while out.count < count {
            let n = rng.next()
            // A timestamp, a level, a few fields, some words, a number or an id.
            out += Array("2024-05-\(10 + n % 18)T\(10 + n % 13):\(10 + (n >> 8) % 50):\(10 + (n >> 16) % 50).\(n % 1000)Z ".utf8)
            out += Array(levels[Int((n >> 24) % UInt64(levels.count))].utf8)
            out += Array(" {\"user_id\": \(n % 100_000), \"session\": \"".utf8)
            for _ in 0..<8 { out.append(Array("0123456789abcdef".utf8)[Int(rng.next() % 16)]) }
            out += Array("\", \"msg\": \"".utf8)
            for _ in 0..<(3 + Int(rng.next() % 9)) {
                out += Array(words[Int(rng.next() % UInt64(words.count))].utf8)
                out.append(0x20)
            }
            out += Array("\", \"ms\": \(rng.next() % 2000)}\n".utf8)
        }
        return Array(out.prefix(count))
    }

    private static func heap(_ count: Int, _ rng: inout SplitMix64) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count + 512)
        func word(_ value: UInt64) { withUnsafeBytes(of: value.littleEndian) { out += $0 } }
        let heapBase: UInt64 = 0x0000_55d3_a000_0000
        let libraryBase: UInt64 = 0x0000_7f1c_2000_0000
        while out.count < count {
            let kind = rng.next() % 100
            let size = 16 * Int(1 + rng.next() % 24)
            let end = out.count + 8 + size
            word(UInt64(size + 16) | 1)  // the allocator's header: size, "previous in use"
            switch kind {
            case 0..<30:  // a string
                out += text(size, &rng)
            case 30..<75:  // an object: pointers, a vtable, counts, flags
                for _ in 0..<(size / 8) {
                    let r = rng.next()
                    switch r % 10 {
                    case 0..<4: word(heapBase + (r >> 8) % (64 << 20) & ~15)
                    case 4: word(libraryBase + (r >> 8) % 4096 * 8)
                    case 5..<7: word((r >> 8) % 1000)
                    case 7: word(0)
                    case 8: word(UInt64(r >> 40).bitPatternDouble)
                    default: word(r % 2)
                    }
                }
            case 75..<85:  // hashes, keys, compressed bytes
                out += random(size, &rng)
            default:  // zeroed, fresh or freed
                out += [UInt8](repeating: 0, count: size)
            }
            if out.count > end { out.removeLast(out.count - end) }
        }
        return Array(out.prefix(count))
    }
}

private extension UInt64 {
    /// The bits of a double between 0 and 65536 with two decimals, as prices and
    /// durations are.
    var bitPatternDouble: UInt64 { (Double(self % 6_553_600) / 100).bitPattern }
}

/// A small, fast, deterministic generator (SplitMix64).
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
