import FerryIO
import Foundation

/// Moves bytes from `bytes` at `i` into `buffer` until it holds `count`; true once it does.
private func fill(_ buffer: inout [UInt8], to count: Int, from bytes: UnsafeRawBufferPointer, at i: inout Int) -> Bool {
    let take = min(count - buffer.count, bytes.count - i)
    buffer += bytes[i..<(i + take)]
    i += take
    return buffer.count == count
}

/// A page of guest RAM as QEMU names it on its streams: the RAM block's name and the page's
/// offset in it.
struct GuestPage: Hashable, Sendable {
    var block: String
    var offset: UInt64
}

/// Reads the page requests out of QEMU 7.2's return path (the destination QEMU's messages
/// to the source QEMU on the main stream's back direction), fed in pieces as they come.
/// Each message is a big-endian 16-bit type and 16-bit length, then that many bytes;
/// `REQ_PAGES_ID` (3) is a 64-bit offset, a 32-bit length and the block's name (a length
/// byte, then the name), `REQ_PAGES` (4) the same without the name (the block of the
/// request before). Other messages are passed over. Pure: no clock, no I/O.
struct ReturnPathReader: Sendable {
    static let requestPagesWithName: UInt16 = 3
    static let requestPages: UInt16 = 4

    private var header: [UInt8] = []
    private var payload: [UInt8] = []
    private var type: UInt16 = 0
    private var length = 0
    private var block: String?
    /// Set when the stream stopped making sense (a request with no block named yet): no
    /// more requests are read from it.
    private(set) var lost = false

    /// The pages requested in `bytes`, in order.
    mutating func feed(_ bytes: UnsafeRawBufferPointer) -> [GuestPage] {
        var pages: [GuestPage] = []
        var i = 0
        while i < bytes.count && !lost {
            if header.count < 4 {
                if fill(&header, to: 4, from: bytes, at: &i) {
                    type = UInt16(header[0]) << 8 | UInt16(header[1])
                    length = Int(UInt16(header[2]) << 8 | UInt16(header[3]))
                    payload.removeAll(keepingCapacity: true)
                }
                if header.count < 4 || length > 0 { continue }
            } else if !fill(&payload, to: length, from: bytes, at: &i) {
                continue
            }
            if let page = message() { pages.append(page) }
            header.removeAll(keepingCapacity: true)
        }
        return pages
    }

    private mutating func message() -> GuestPage? {
        guard type == Self.requestPages || type == Self.requestPagesWithName, payload.count >= 12 else { return nil }
        let offset = payload[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        if type == Self.requestPagesWithName {
            guard payload.count >= 13, payload.count >= 13 + Int(payload[12]) else {
                lost = true
                return nil
            }
            block = String(decoding: payload[13..<(13 + Int(payload[12]))], as: UTF8.self)
        }
        guard let block else {
            lost = true
            return nil
        }
        return GuestPage(block: block, offset: offset)
    }
}

/// Reads which pages go by on QEMU 7.2's postcopy preempt channel (the source QEMU's
/// requested pages), fed in pieces as they come. Each page is a big-endian 64-bit word, the
/// page's offset with flags in its low bits; without `CONTINUE` (0x20) the block's name
/// follows (a length byte, then the name); then the page: one byte for `ZERO` (0x02), a
/// target page (4 KiB) for `PAGE` (0x08). `EOS` (0x10) stands alone. Anything else (QEMU
/// sends nothing else there) stops the reading for good rather than guess. Pure.
struct PreemptPageReader: Sendable {
    static let zero: UInt64 = 0x02, page: UInt64 = 0x08, endOfSection: UInt64 = 0x10, continued: UInt64 = 0x20
    static let targetPageSize = 4096

    private enum Step: Sendable { case word, nameLength, name(Int), body(Int) }
    private var step = Step.word
    private var word: [UInt8] = []
    private var name: [UInt8] = []
    private var flags: UInt64 = 0
    private var offset: UInt64 = 0
    private var block: String?
    private(set) var lost = false

    /// The pages whose last byte is in `bytes`, in order.
    mutating func feed(_ bytes: UnsafeRawBufferPointer) -> [GuestPage] {
        var pages: [GuestPage] = []
        var i = 0
        while i < bytes.count && !lost {
            switch step {
            case .word:
                guard fill(&word, to: 8, from: bytes, at: &i) else { continue }
                let value = word.reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                word.removeAll(keepingCapacity: true)
                flags = value & UInt64(Self.targetPageSize - 1)
                offset = value & ~UInt64(Self.targetPageSize - 1)
                if flags == Self.endOfSection { continue }
                guard flags & ~(Self.zero | Self.page | Self.continued) == 0, (flags & Self.zero != 0) != (flags & Self.page != 0) else {
                    lost = true
                    continue
                }
                if flags & Self.continued != 0 {
                    guard block != nil else {
                        lost = true
                        continue
                    }
                    step = .body(flags & Self.zero != 0 ? 1 : Self.targetPageSize)
                } else {
                    step = .nameLength
                }
            case .nameLength:
                let length = Int(bytes[i])
                i += 1
                name.removeAll(keepingCapacity: true)
                step = length == 0 ? .body(flags & Self.zero != 0 ? 1 : Self.targetPageSize) : .name(length)
                if length == 0 { block = "" }
            case .name(let length):
                guard fill(&name, to: length, from: bytes, at: &i) else { continue }
                block = String(decoding: name, as: UTF8.self)
                step = .body(flags & Self.zero != 0 ? 1 : Self.targetPageSize)
            case .body(let left):
                let take = min(left, bytes.count - i)
                i += take
                if take == left {
                    pages.append(GuestPage(block: block ?? "", offset: offset))
                    step = .word
                } else {
                    step = .body(left - take)
                }
            }
        }
        return pages
    }
}

/// How long the guest's page faults waited in postcopy, as Ferry sees them at the
/// destination: from a request leaving the destination QEMU (read from its return path)
/// to its page going into it on the preempt channel. A request whose page comes on the
/// main stream instead (the background copy got there first) is counted, not timed.
///
/// Threads: the reverse reader of the main stream calls ``requested(_:)``, the preempt
/// channel's writer ``delivered(_:)``, the session ``summary()``; all under one lock.
final class PostcopyFaultClock: Sendable {
    private struct State: Sendable {
        var requests = ReturnPathReader()
        var pages = PreemptPageReader()
        var waiting: [GuestPage: ContinuousClock.Instant] = [:]
        var requestCount: UInt64 = 0
        var latencies: [Double] = []
    }
    private let state = Locked(State())

    func requested(_ bytes: UnsafeRawBufferPointer) {
        let now = ContinuousClock.now
        state.withLock { s in
            for page in s.requests.feed(bytes) {
                s.requestCount += 1
                if s.waiting[page] == nil { s.waiting[page] = now }
            }
        }
    }

    func delivered(_ bytes: UnsafeRawBufferPointer) {
        let now = ContinuousClock.now
        state.withLock { s in
            for page in s.pages.feed(bytes) {
                if let asked = s.waiting.removeValue(forKey: page) { s.latencies.append((now - asked).seconds * 1000) }
            }
        }
    }

    /// Requests seen, and the p50, p99 and longest wait of those timed (milliseconds).
    func summary() -> (requests: UInt64, p50: Double?, p99: Double?, max: Double?) {
        state.withLock { s in
            let sorted = s.latencies.sorted()
            func percentile(_ p: Double) -> Double? {
                guard !sorted.isEmpty else { return nil }
                return sorted[min(sorted.count - 1, Int((p * Double(sorted.count)).rounded(.up)) - 1)]
            }
            return (s.requestCount, percentile(0.5), percentile(0.99), sorted.last)
        }
    }
}
