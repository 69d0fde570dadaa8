@testable import FerryMigration
import Foundation
import Testing

/// QEMU 7.2's postcopy messages as Ferry reads them for the fault latencies: page requests
/// on the return path, pages on the preempt channel, whole and split at every byte.
@Suite("Postcopy: page requests and requested pages read from QEMU's streams")
struct PostcopyFaultsTests {
    static func be(_ value: UInt64, _ bytes: Int) -> [UInt8] { (0..<bytes).reversed().map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) } }

    /// A return path: a PONG, a request naming its block, one that does not, a SHUT.
    static var returnPath: [UInt8] {
        var out: [UInt8] = []
        out += be(2, 2) + be(4, 2) + be(7, 4)                                  // PONG 7
        let name = Array("pc.ram".utf8)
        out += be(3, 2) + be(UInt64(13 + name.count), 2) + be(0x2000, 8) + be(4096, 4) + [UInt8(name.count)] + name
        out += be(4, 2) + be(12, 2) + be(0x5000, 8) + be(4096, 4)
        out += be(1, 2) + be(4, 2) + be(0, 4)                                  // SHUT
        return out
    }

    /// A preempt channel: a page naming its block, a zero page continuing it, an EOS.
    static var preempt: [UInt8] {
        let name = Array("pc.ram".utf8)
        var out: [UInt8] = be(0x2000 | 0x08, 8) + [UInt8(name.count)] + name + [UInt8](repeating: 0xAB, count: 4096)
        out += be(0x5000 | 0x02 | 0x20, 8) + [0]
        out += be(0x10, 8)
        return out
    }

    static func feed<R>(_ reader: inout R, _ bytes: [UInt8], split: Int, _ step: (inout R, UnsafeRawBufferPointer) -> [GuestPage]) -> [GuestPage] {
        var pages: [GuestPage] = []
        var i = 0
        while i < bytes.count {
            let piece = Array(bytes[i..<min(bytes.count, i + split)])
            piece.withUnsafeBytes { pages += step(&reader, $0) }
            i += split
        }
        return pages
    }

    let expected = [GuestPage(block: "pc.ram", offset: 0x2000), GuestPage(block: "pc.ram", offset: 0x5000)]

    @Test("page requests are read from the return path whole, in any split, and other messages are passed over",
          arguments: [1, 2, 3, 5, 13, 4096, 100_000])
    func requests(split: Int) {
        var reader = ReturnPathReader()
        let pages = Self.feed(&reader, Self.returnPath, split: split) { $0.feed($1) }
        #expect(pages == expected)
        #expect(!reader.lost)
    }

    @Test("pages are read from the preempt channel whole and in any split", arguments: [1, 7, 8, 9, 4096, 100_000])
    func pages(split: Int) {
        var reader = PreemptPageReader()
        let pages = Self.feed(&reader, Self.preempt, split: split) { $0.feed($1) }
        #expect(pages == expected)
        #expect(!reader.lost)
    }

    @Test("a request without a block named before, or a page with flags QEMU never sends there, stops the reading instead of guessing")
    func unknownStops() {
        var requests = ReturnPathReader()
        let bare = Self.be(4, 2) + Self.be(12, 2) + Self.be(0x5000, 8) + Self.be(4096, 4)
        #expect(bare.withUnsafeBytes { requests.feed($0) }.isEmpty)
        #expect(requests.lost)
        var pages = PreemptPageReader()
        let odd = Self.be(0x2000 | 0x40, 8) + Self.preempt
        #expect(odd.withUnsafeBytes { pages.feed($0) }.isEmpty)
        #expect(pages.lost)
    }

    @Test("the clock times a request to its page, counts a request whose page never comes on the preempt channel, and gives percentiles")
    func clock() {
        let clock = PostcopyFaultClock()
        Self.returnPath.withUnsafeBytes { clock.requested($0) }
        let onlyFirst = Array(Self.preempt.prefix(8 + 1 + 6 + 4096))
        onlyFirst.withUnsafeBytes { clock.delivered($0) }
        let summary = clock.summary()
        #expect(summary.requests == 2)
        let p50 = try? #require(summary.p50)
        #expect((p50 ?? -1) >= 0)
        #expect(summary.p99 == summary.max)
    }
}
