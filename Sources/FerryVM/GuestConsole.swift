import FerryIO
import Foundation

/// A heartbeat line of the demo guest's workload (see guest/README.md):
/// `FERRY-HB seq=<n> ms=<ms> mem_mib=<m> gen=<g> checked=<c> passes=<p> errors=<e> status=OK|FAIL`
public struct Heartbeat: Sendable, Equatable {
    public var sequence: UInt64
    public var guestMilliseconds: UInt64
    public var errors: UInt64
    public var passes: UInt64
    /// Pages the workload has rewritten since its fill (`gen=`), 4 KiB each.
    public var rewrittenPages: UInt64
    public var ok: Bool

    public init?(line: Substring) {
        guard let start = line.range(of: "FERRY-HB ") else { return nil }
        var fields: [Substring: Substring] = [:]
        for part in line[start.upperBound...].split(separator: " ") {
            guard let eq = part.firstIndex(of: "=") else { continue }
            fields[part[..<eq]] = part[part.index(after: eq)...]
        }
        guard let seq = fields["seq"].flatMap({ UInt64($0) }), let status = fields["status"] else { return nil }
        sequence = seq
        guestMilliseconds = fields["ms"].flatMap { UInt64($0) } ?? 0
        errors = fields["errors"].flatMap { UInt64($0) } ?? 0
        passes = fields["passes"].flatMap { UInt64($0) } ?? 0
        rewrittenPages = fields["gen"].flatMap { UInt64($0) } ?? 0
        ok = status.hasPrefix("OK") && errors == 0
    }
}

/// Reads a VM's serial log: heartbeats, readiness, errors.
public struct GuestConsole: Sendable {
    public let path: String
    public init(path: String) { self.path = path }

    /// The log, with the serial console's CR LF line ends made LF (Swift's String treats
    /// "\r\n" as one Character, which `split(separator: "\n")` would not split at).
    public var text: String {
        (FileManager.default.contents(atPath: path)).map { Self.normalize($0) } ?? ""
    }

    public static func normalize(_ data: Data) -> String {
        String(decoding: data.filter { $0 != 13 }, as: UTF8.self)
    }

    public var heartbeats: [Heartbeat] {
        text.split(separator: "\n").compactMap { Heartbeat(line: $0) }
    }

    public var lastHeartbeat: Heartbeat? {
        text.split(separator: "\n").reversed().lazy.compactMap { Heartbeat(line: $0) }.first
    }

    public var isReady: Bool { text.contains("FERRY-READY") }

    /// The disk workload's last account (`FERRY-DISK written=W checked=C errors=E max_write_ms=M`, once a
    /// second when the guest has `ferry.disk`): blocks written, blocks read back and checked
    /// against the generation they must carry, and how many were wrong.
    public var lastDiskStatus: (written: UInt64, checked: UInt64, errors: UInt64)? {
        for line in text.split(separator: "\n").reversed() where line.hasPrefix("FERRY-DISK written=") {
            var fields: [String: UInt64] = [:]
            for part in line.split(separator: " ").dropFirst() {
                let kv = part.split(separator: "=", maxSplits: 1)
                if kv.count == 2, let v = UInt64(kv[1]) { fields[String(kv[0])] = v }
            }
            guard let w = fields["written"], let c = fields["checked"], let e = fields["errors"] else { return nil }
            return (w, c, e)
        }
        return nil
    }
    public var errorLines: [String] {
        text.split(separator: "\n").filter { $0.contains("FERRY-ERROR") }.map(String.init)
    }

    /// Waits until `predicate` holds for the log text. True if it did within `timeout`.
    public func wait(timeout: Duration, poll: Duration = .milliseconds(100), _ predicate: (String) -> Bool) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if predicate(text) { return true }
            Thread.sleep(forTimeInterval: poll.seconds)
        }
        return predicate(text)
    }
}

/// Watches heartbeats appear in one or more serial logs (the source's and the
/// destination's) and measures, by the host's clock, the longest gap between two
/// consecutive heartbeats: the guest's pause as the guest itself shows it.
///
/// Its own thread ("heartbeat-watch") scans the logs; any thread adds a log, stops it or
/// reads the figures.
// Every `var` is under `lock`; `clock` and `origin` are immutable.
public final class HeartbeatWatcher: @unchecked Sendable {
    private let lock = Monitor()
    private var paths: [String]
    private var offsets: [String: UInt64] = [:]
    /// The unfinished last line. One for all logs: the guest writes to one console at a
    /// time, and a line cut by the switchover is finished in the destination's log.
    private var partial = ""
    private var lastSeenAt: Double?
    private var lastSequence: UInt64?
    private var _largestGap = 0.0
    private var _count = 0
    private var _errors = false
    private var _sequenceRegressed = false
    private var _skipped: UInt64 = 0
    /// The disk workload's `written` count, first and last seen (watcher's seconds, blocks).
    private var firstDisk: (at: Double, written: UInt64)?
    private var lastDisk: (at: Double, written: UInt64)?
    private var _slowestDiskWrite = 0.0
    /// Each heartbeat's rewritten pages, with when it was seen (watcher's seconds).
    private var rewrites: [(at: Double, pages: UInt64)] = []
    private var stopped = false
    private let clock = ContinuousClock()
    private let origin = ContinuousClock.now

    public init(paths: [String]) {
        self.paths = paths
        for p in paths { offsets[p] = Self.size(p) }
        startThread("heartbeat-watch") { [self] in loop() }
    }

    /// Also watch `path` (e.g. the destination's log once it exists).
    public func add(path: String) {
        lock.withLock {
            if !paths.contains(path) {
                paths.append(path)
                offsets[path] = 0
            }
        }
    }

    public var largestGapSeconds: Double { lock.withLock { _largestGap } }

    /// The guest's slowest disk write while watched (ms, as its workload timed it).
    public var slowestDiskWriteMilliseconds: Double { lock.withLock { _slowestDiskWrite } }

    /// The guest's disk writes while watched, MiB/s (its `FERRY-DISK` lines, 4 KiB blocks);
    /// nil without two of them a second apart.
    public var diskWriteMiBPerSecond: Double? {
        lock.withLock {
            guard let first = firstDisk, let last = lastDisk, last.at - first.at >= 1, last.written >= first.written else { return nil }
            return Double(last.written - first.written) * 4096 / Double(1 << 20) / (last.at - first.at)
        }
    }
    /// Seconds since the watch began (the time base of ``memoryWriteMiBPerSecond(from:to:)``).
    public var now: Double { (ContinuousClock.now - origin).seconds }

    /// The guest's memory rewrites between two moments of the watch, MiB/s (its
    /// heartbeats' `gen=`, 4 KiB pages); nil without two heartbeats a second apart in it.
    public func memoryWriteMiBPerSecond(from: Double, to: Double) -> Double? {
        lock.withLock {
            let inside = rewrites.filter { $0.at >= from && $0.at <= to }
            guard let first = inside.first, let last = inside.last, last.at - first.at >= 1, last.pages >= first.pages else { return nil }
            return Double(last.pages - first.pages) * 4096 / Double(1 << 20) / (last.at - first.at)
        }
    }

    public var heartbeatCount: Int { lock.withLock { _count } }
    public var sawErrors: Bool { lock.withLock { _errors } }
    public var sequenceWentBack: Bool { lock.withLock { _sequenceRegressed } }
    public var lastSeq: UInt64? { lock.withLock { lastSequence } }
    /// Heartbeat numbers that never appeared between two that did (the guest's counter
    /// is continuous across a migration, so this should stay 0).
    public var skippedSequences: UInt64 { lock.withLock { _skipped } }

    public func stop() { lock.withLock { stopped = true } }

    private func loop() {
        while !lock.withLock({ stopped }) {
            for path in lock.withLock({ paths }) { scan(path) }
            Thread.sleep(forTimeInterval: 0.005)
        }
    }

    private static func size(_ path: String) -> UInt64 {
        ((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? NSNumber)?.uint64Value ?? 0
    }

    private func scan(_ path: String) {
        guard let handle = FileHandle(forReadingAtPath: path) else { return }
        defer { try? handle.close() }
        let offset = lock.withLock { offsets[path] ?? 0 }
        try? handle.seek(toOffset: offset)
        guard let data = try? handle.readToEnd(), !data.isEmpty else { return }
        let now = (ContinuousClock.now - origin).seconds
        lock.withLock {
            offsets[path] = offset + UInt64(data.count)
            let text = partial + GuestConsole.normalize(data)
            var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
            partial = String(lines.removeLast())
            for line in lines {
                if line.hasPrefix("FERRY-DISK written=") {
                    let fields = Dictionary(line.split(separator: " ").dropFirst().compactMap { part -> (Substring, UInt64)? in
                        let kv = part.split(separator: "=", maxSplits: 1)
                        return kv.count == 2 ? UInt64(kv[1]).map { (kv[0], $0) } : nil
                    }, uniquingKeysWith: { a, _ in a })
                    if let value = fields["written"] {
                        if firstDisk == nil { firstDisk = (now, value) }
                        lastDisk = (now, value)
                    }
                    if let slowest = fields["max_write_ms"] { _slowestDiskWrite = max(_slowestDiskWrite, Double(slowest)) }
                }
                guard let hb = Heartbeat(line: line) else { continue }
                if let last = lastSequence, hb.sequence <= last { _sequenceRegressed = hb.sequence < last; continue }
                if let at = lastSeenAt { _largestGap = max(_largestGap, now - at) }
                if let last = lastSequence { _skipped += hb.sequence - last - 1 }
                lastSeenAt = now
                lastSequence = hb.sequence
                rewrites.append((now, hb.rewrittenPages))
                _count += 1
                if !hb.ok { _errors = true }
            }
        }
    }
}
