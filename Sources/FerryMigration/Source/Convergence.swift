import FerryQMP
import Foundation

/// `--converge`: what Ferry does when the guest dirties its memory faster than the
/// migration can carry it.
public enum ConvergeMode: String, Sendable, CaseIterable, Codable {
    /// Throttle the vCPUs as little and as late as will let the migration finish; switch to
    /// postcopy (where `--postcopy allowed`) when the throttle cannot do it in time
    /// (``ConvergencePolicy/shouldSwitchToPostcopy(elapsedSeconds:guestBytes:rateBytesPerSecond:needed:)``).
    case auto
    case throttle
    /// Switch to postcopy once QEMU's first pass is done (needs `--postcopy allowed`).
    case postcopy
    /// Nothing: a guest that writes faster than the link never finishes, and `--timeout`
    /// ends the migration with the VM on the source (QEMU's own behaviour).
    case none
}

/// How much to slow the guest's vCPUs so that the migration converges, from what Ferry
/// measures: the guest's dirty rate (QEMU's, per pass) against the rate Ferry's channels
/// actually carry. Pure: `SourceMigration` feeds it each poll and sets what it says in
/// QEMU's auto-converge parameters (docs/ARCHITECTURE.md, "Convergence").
///
/// The aim is that once throttled the guest dirties at most `targetShare` of what the link
/// carries, so that each pass leaves at most half of the one before and the migration ends
/// in a few passes; and not one percent more than that, since every percent is the guest's
/// work. QEMU applies the throttle itself (a vCPU sleeps for the throttled share of every
/// 10 ms timeslice), starting when a pass dirties more than `triggerPercent` of what it sent,
/// twice in a row: a guest that converges on its own is never slowed.
/// `--postcopy`: whether the migration may switch to postcopy, where the VM runs at the
/// destination before all its memory is there (and both hosts are needed until it is).
public enum PostcopyPolicy: String, Sendable, CaseIterable, Codable {
    case never
    case allowed
}

public struct ConvergencePolicy: Sendable, Equatable {
    /// The share of the carried rate the throttled guest may dirty.
    public static let targetShare = 0.5
    /// QEMU's `throttle-trigger-threshold`: throttling starts when a pass dirties more than
    /// this percent of what it sent, twice in a row: the same line as `targetShare`, so that
    /// QEMU starts exactly when Ferry's figures say the passes no longer halve.
    public static let triggerPercent = Int(targetShare * 100)
    /// QEMU's range for the throttle.
    public static let qemuRange = 1...99

    /// `--max-throttle`: the most the guest may be slowed, percent.
    public var ceiling: Int

    public init(ceiling: Int = 99) {
        self.ceiling = min(max(ceiling, Self.qemuRange.lowerBound), Self.qemuRange.upperBound)
    }

    /// What QEMU measured at a throttle: the throttle, percent, and the dirty rate then.
    public struct Measurement: Sendable, Equatable {
        public var throttlePercent: Int
        public var dirtyBytesPerSecond: Double
        public init(throttlePercent: Int, dirtyBytesPerSecond: Double) {
            self.throttlePercent = throttlePercent
            self.dirtyBytesPerSecond = dirtyBytesPerSecond
        }
    }

    /// The throttle the guest needs, percent (0: none), given the dirty rate QEMU measured
    /// under the throttle it had (`current`) and the carried rate, bytes per second.
    ///
    /// The model: a throttled vCPU runs (100 - t)% of the time, so it dirties that share of
    /// what it would unthrottled. It fails for a guest whose passes rewrite its whole
    /// working set (QEMU counts pages dirtied, not writes): there the rate QEMU measures
    /// hardly falls until the throttle is deep. `before`, the measurement at the last
    /// lower throttle, tells the two apart: if the rate fell by less than half of what the
    /// model promised, the next step goes at least half way to the ceiling, instead of
    /// creeping up a pass (two of QEMU's syncs) at a time.
    public func needed(dirtyBytesPerSecond dirty: Double, carriedBytesPerSecond rate: Double, current: Int,
                       before: Measurement? = nil) -> Int {
        guard dirty > 0, rate > 0 else { return 0 }
        let running = 1 - Double(min(max(current, 0), 99)) / 100
        let raw = dirty / running
        let allowed = Self.targetShare * rate
        guard raw > allowed else { return 0 }
        var percent = Int((100 * (1 - allowed / raw)).rounded(.up))
        if let before, before.throttlePercent < current, before.dirtyBytesPerSecond > 0 {
            let promised = before.dirtyBytesPerSecond * running / (1 - Double(before.throttlePercent) / 100)
            let fell = before.dirtyBytesPerSecond - dirty
            if fell < (before.dirtyBytesPerSecond - promised) / 2 { percent = max(percent, current + (ceiling - current + 1) / 2) }
        }
        return min(max(percent, Self.qemuRange.lowerBound), ceiling)
    }

    /// QEMU's parameters for a guest that needs `needed` percent while it has `current`:
    /// before throttling starts, the throttle it starts at; once it runs, the step QEMU adds
    /// each time a pass still dirties too much. nil when nothing needs changing.
    public func parameters(needed: Int, current: Int) -> (initial: Int?, increment: Int?) {
        guard needed > 0 else { return (nil, nil) }
        if current == 0 { return (needed, nil) }
        return (nil, max(1, needed - current))
    }

    /// `--converge auto` with postcopy allowed: how long the throttle may try after QEMU's
    /// first pass, as a multiple of the time that pass took (one pass over the guest at the
    /// rate the link carries), before postcopy takes over. Postcopy then sends at most what
    /// is left once more, so a migration stays within about twice or three times a single
    /// pass even when the throttle cannot help.
    public static let postcopyAfterPasses = 1.0

    /// Whether `auto` should give up throttling for postcopy: a pass run under the ceiling
    /// still needs more (`current`, the throttle the latest measured pass ran at, is at the
    /// ceiling and `needed` says no less), or the throttle has had ``postcopyAfterPasses``
    /// first passes' time without the migration converging.
    /// `needed`: what ``needed(dirtyBytesPerSecond:carriedBytesPerSecond:current:before:)``
    /// says now (0: the passes halve on their own, so QEMU will finish).
    public func shouldSwitchToPostcopy(secondsSinceFirstPass: Double, firstPassSeconds: Double, current: Int, needed: Int) -> Bool {
        guard needed > 0 else { return false }
        if current >= ceiling && needed >= ceiling { return true }
        return firstPassSeconds > 0 && secondsSinceFirstPass >= Self.postcopyAfterPasses * firstPassSeconds
    }
}

/// A switch to postcopy, for the report: when, why, and what the guest waited for pages.
public struct PostcopyAccount: Codable, Sendable, Equatable {
    /// Seconds since the migration started that Ferry asked QEMU to switch.
    public var requestedAt: Double
    /// Why: `--converge postcopy`, the throttle gave up, or the operator (`--postcopy-now`).
    public var reason: String
    /// What QEMU had left to send then.
    public var remainingBytes: UInt64
    /// When the VM ran at the destination (the commit), seconds since the start.
    public var runningAt: Double?
    /// When the last page was there and the migration completed.
    public var completedAt: Double?
    /// The destination's account (``PostcopyDoneMessage``).
    public var blocktimeMilliseconds: Double?
    public var requests: UInt64?
    public var latencyP50Milliseconds: Double?
    public var latencyP99Milliseconds: Double?
    public var latencyMaxMilliseconds: Double?
    /// When each resume began (seconds since the start): the session that carried postcopy
    /// was lost with a daemon, and a new one took it on (``SourceMigration/resumePostcopy``).
    public var resumedAt: [Double]?

    public init(requestedAt: Double, reason: String, remainingBytes: UInt64) {
        self.requestedAt = requestedAt
        self.reason = reason
        self.remainingBytes = remainingBytes
    }

    /// The report's line.
    public var summary: String {
        var line = String(format: "switched at %.1f s (%@; %@ left to send)", requestedAt, reason, Format.bytes(remainingBytes))
        if let runningAt { line += String(format: ", VM ran at the destination from %.1f s", runningAt) }
        if let completedAt { line += String(format: ", last page at %.1f s", completedAt) }
        if let requests {
            line += "; \(requests) page request(s)"
            if let p50 = latencyP50Milliseconds, let p99 = latencyP99Milliseconds {
                line += String(format: ", waited p50 %.1f ms, p99 %.1f ms", p50, p99)
                if let max = latencyMaxMilliseconds { line += String(format: ", max %.1f ms", max) }
            }
        }
        if let blocktimeMilliseconds { line += String(format: "; vCPUs blocked on missing pages %.0f ms in all (QEMU)", blocktimeMilliseconds) }
        if let resumedAt, !resumedAt.isEmpty {
            line += "; resumed in a new session \(resumedAt.count) time(s), at " + resumedAt.map { String(format: "%.1f s", $0) }.joined(separator: ", ")
        }
        return line
    }
}

/// The throttle over a migration, for the report.
public struct ConvergenceAccount: Codable, Sendable, Equatable {
    public struct Point: Codable, Sendable, Equatable {
        /// Seconds since the migration started.
        public var at: Double
        public var throttlePercent: Int
        public var dirtyBytesPerSecond: UInt64
    }
    public var mode: ConvergeMode
    /// `--max-throttle`.
    public var ceilingPercent: Int
    /// Each change of the throttle, with the dirty rate QEMU measured then.
    public var points: [Point] = []
    /// The highest dirty rate QEMU measured, before or under the throttle.
    public var peakDirtyBytesPerSecond: UInt64 = 0

    public init(mode: ConvergeMode, ceilingPercent: Int) {
        self.mode = mode
        self.ceilingPercent = ceilingPercent
    }

    public var peakThrottlePercent: Int { points.map(\.throttlePercent).max() ?? 0 }
    public var throttledAt: Double? { points.first { $0.throttlePercent > 0 }?.at }

    /// The report's line.
    public var summary: String {
        var line = "\(mode.rawValue)"
        if let at = throttledAt {
            line += String(format: ": vCPUs throttled from %.1f s, up to %d%% (ceiling %d%%); ", at, peakThrottlePercent, ceilingPercent)
            line += points.filter { $0.throttlePercent > 0 }.prefix(6).map { String(format: "%d%% at %.1f s", $0.throttlePercent, $0.at) }.joined(separator: ", ")
        } else {
            line += ": no throttle needed"
        }
        if peakDirtyBytesPerSecond > 0 { line += "; guest dirtied up to \(Format.bytes(peakDirtyBytesPerSecond))/s" }
        return line
    }
}
