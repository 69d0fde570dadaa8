import FerryIO
import Foundation

/// Connections not yet identified, in arrival order, at most `capacity`: who is shed when
/// one more arrives. The victim is the oldest connection of the address holding the most.
/// sshd's MaxStartups drops new connections at random past a threshold; that still lets
/// a flood from one address crowd out a source that tries once. Shedding by address
/// instead means a flood must come from more addresses than the line has places before a
/// source's one connection is at risk, and even then it goes only if every flooding
/// address holds as few as it; the oldest goes first because a genuine peer speaks at
/// once, so an old silent connection is the least likely to be one.
/// A value: no clock, no sockets (the server does the I/O). Tested in SecurityTests.
struct DoorLine: Sendable {
    struct Entry: Sendable, Equatable {
        var id: Int
        var address: String
        var since: ContinuousClock.Instant
    }

    let capacity: Int
    private(set) var entries: [Entry] = []
    private var countByAddress: [String: Int] = [:]

    init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
    }

    var count: Int { entries.count }

    /// Adds a connection; if the line was full, removes and returns the one shed for it.
    mutating func admit(id: Int, address: String, at now: ContinuousClock.Instant) -> Entry? {
        let shed = entries.count >= capacity ? shedOne() : nil
        entries.append(Entry(id: id, address: address, since: now))
        countByAddress[address, default: 0] += 1
        return shed
    }

    /// Removes and returns the oldest connection of the address holding the most (of
    /// those, the address whose oldest is oldest).
    mutating func shedOne() -> Entry? {
        guard let most = countByAddress.values.max() else { return nil }
        guard let index = entries.firstIndex(where: { countByAddress[$0.address] == most }) else { return nil }
        return take(at: index)
    }

    @discardableResult
    mutating func remove(id: Int) -> Entry? {
        entries.firstIndex { $0.id == id }.map { take(at: $0) }
    }

    /// Removes and returns those that arrived before `deadline`.
    mutating func expire(before deadline: ContinuousClock.Instant) -> [Entry] {
        var expired: [Entry] = []
        while let first = entries.first, first.since < deadline { expired.append(take(at: 0)) }
        return expired
    }

    private mutating func take(at index: Int) -> Entry {
        let entry = entries.remove(at: index)
        let left = countByAddress[entry.address, default: 1] - 1
        countByAddress[entry.address] = left > 0 ? left : nil
        return entry
    }
}

/// Refusals and sheds, for a log that a flood cannot fill: in each interval (1 s) the
/// first `detailedPerInterval` refusals get a line of their own (peer and reason, so
/// that one misconfigured source is diagnosed from its line), sheds never do; the rest
/// are counted and summed up in one line per interval at most, with the busiest
/// addresses. A value: no clock (the caller passes the time), no logger.
struct RefusalTally: Sendable {
    enum Kind: Sendable {
        /// Closed to make room for a newer connection.
        case shed
        /// Sent no whole first frame in time, or closed before it.
        case silent
        /// Said something that was refused: garbage, a wrong key, a bind to nothing.
        case refused
    }

    struct Summary: Sendable, Equatable {
        var shed = 0
        var silent = 0
        var refused = 0
        var addresses = 0
        /// At most three, the most first.
        var busiest: [(address: String, count: Int)] = []
        var interval: Duration = .zero

        static func == (a: Summary, b: Summary) -> Bool {
            a.shed == b.shed && a.silent == b.silent && a.refused == b.refused && a.addresses == b.addresses
                && a.busiest.map(\.address) == b.busiest.map(\.address) && a.busiest.map(\.count) == b.busiest.map(\.count)
                && a.interval == b.interval
        }
    }

    var interval: Duration = .seconds(1)
    var detailedPerInterval = 5
    private var windowStart: ContinuousClock.Instant?
    private var detailed = 0
    private var held = Summary()
    private var byAddress: [String: Int] = [:]

    /// Counts one; true if it should be logged on a line of its own.
    mutating func note(_ kind: Kind, address: String, at now: ContinuousClock.Instant) -> Bool {
        if let start = windowStart, now - start >= interval, held.shed + held.silent + held.refused == 0 {
            windowStart = nil
        }
        if windowStart == nil {
            windowStart = now
            detailed = 0
        }
        if kind != .shed && detailed < detailedPerInterval {
            detailed += 1
            return true
        }
        switch kind {
        case .shed: held.shed += 1
        case .silent: held.silent += 1
        case .refused: held.refused += 1
        }
        byAddress[address, default: 0] += 1
        return false
    }

    /// What was held back, once its interval is over; nil before, or if nothing was.
    mutating func summary(at now: ContinuousClock.Instant) -> Summary? {
        guard let start = windowStart, now - start >= interval else { return nil }
        windowStart = nil
        guard held.shed + held.silent + held.refused > 0 else { return nil }
        var summary = held
        summary.addresses = byAddress.count
        summary.busiest = byAddress.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }.prefix(3).map { ($0.key, $0.value) }
        summary.interval = now - start
        held = Summary()
        byAddress = [:]
        return summary
    }
}
