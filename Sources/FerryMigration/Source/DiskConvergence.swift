/// Whether a disk's copy converges, and the limit on the guest's writes to that disk that
/// makes it: one per copied disk, fed QEMU's mirror progress and the bytes its stream carried.
///
/// Ferry's mirrors run in QEMU's background mode: a guest write completes at once, and the
/// mirror copies what it dirtied later. That copy keeps up only while the guest dirties the
/// disk more slowly than the copy's share of the link carries it. When it does not, nothing
/// in QEMU stops the gap from growing: the first pass never catches up, or, after it did,
/// what is left to copy grows until the pause has to carry it. So Ferry watches what is left
/// (`len - offset` of the job: dirty bytes plus those in flight) against what the copy
/// moves: over a window, what is left must shrink by at least a tenth of what the copy
/// carried (the guest dirtying less than nine tenths of the copy's rate). A long first pass
/// on a slow link shrinks by all the copy carries, and is never judged. When what is left
/// does not shrink so while above what the link moves in a tenth of a second, Ferry limits
/// the guest's writes to that disk to half the rate its copy achieved over the window; if
/// that is still not enough, it halves the limit again, never below 1 MiB/s or a quarter of
/// the copy's rate, whichever is less. The limit is lifted when the migration ends either
/// way (on success the source QEMU ends).
///
/// As little and as late as will do: a guest that writes slower than its copy is never
/// limited, and the limit is never raised back mid-copy (it would undo the convergence it
/// bought, and oscillate).
public struct DiskConvergence: Sendable {
    /// How long what is left must fail to shrink before the guest is limited.
    public static let window = 5.0
    /// The smallest limit Ferry sets (1 MiB/s, or a quarter of the copy's rate on a link
    /// slower than 4 MiB/s): a guest that is slowed more is stalled.
    public static let floorBytesPerSecond: UInt64 = 1 << 20
    /// A copy slower than this (256 KiB/s) is stalled by its link (NICs lost, a failover).
    static let stalledBytesPerSecond = 256.0 * 1024
    /// What is left counts as caught up below this much (the mirror's requests in flight).
    static let minimumSlackBytes: UInt64 = 4 << 20
    /// ... or below what the copy moves in this long at its rate.
    static let slackSeconds = 0.1

    struct Sample: Sendable, Equatable {
        var at: Double
        var remainingBytes: UInt64
        var sentBytes: UInt64
    }

    /// The guest's write limit in force on this disk (nil: none).
    private(set) var limitBytesPerSecond: UInt64?
    /// Samples since the last decision, oldest first.
    private(set) var samples: [Sample] = []

    enum Decision: Sendable, Equatable {
        /// Limit the guest's writes to the disk: `bytesPerSecond`; `remainingBytes` and
        /// `copyBytesPerSecond` say why.
        case limit(bytesPerSecond: UInt64, remainingBytes: UInt64, copyBytesPerSecond: Double)
    }

    /// Records what the copy had left (`remaining`) and its stream's bytes sent so far
    /// (`sent`) at `now` (seconds); returns a new limit if one is needed.
    mutating func observe(now: Double, remaining: UInt64, sent: UInt64) -> Decision? {
        samples.append(Sample(at: now, remainingBytes: remaining, sentBytes: sent))
        guard let first = samples.first, now - first.at >= Self.window else { return nil }
        // The window's oldest sample that is still at least `window` old.
        let start = samples.lastIndex { now - $0.at >= Self.window } ?? 0
        let old = samples[start]
        samples.removeFirst(start)
        let seconds = now - old.at
        let copyRate = Double(sent &- old.sentBytes) / seconds
        let slack = max(Self.minimumSlackBytes, UInt64(copyRate * Self.slackSeconds))
        let carried = Double(sent &- old.sentBytes)
        let shrinking = Double(old.remainingBytes) - Double(remaining) >= carried * 0.1
        // A copy that hardly moves is the link's doing (NICs lost, failing over), not the
        // guest's: slowing the guest would not help, and would outlast the outage.
        let moving = copyRate >= Self.stalledBytesPerSecond
        guard remaining > slack, !shrinking, moving else { return nil }
        let floor = min(Self.floorBytesPerSecond, UInt64(copyRate / 4))
        let next: UInt64
        if let current = limitBytesPerSecond {
            guard current > floor else { return nil }
            next = max(floor, current / 2)
        } else {
            next = max(floor, UInt64(copyRate / 2))
        }
        limitBytesPerSecond = next
        // A new window from now: the guest's new pace needs its own.
        samples = [Sample(at: now, remainingBytes: remaining, sentBytes: sent)]
        return .limit(bytesPerSecond: next, remainingBytes: remaining, copyBytesPerSecond: copyRate)
    }
}
