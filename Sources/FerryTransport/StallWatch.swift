/// Tells a dead data channel from an idle one, for the source's watchdog.
///
/// A channel is dead when the oldest byte it has outstanding has gone unacknowledged for
/// longer than the stall timeout. TCP_INFO does not give that age: its `last_ack_recv`
/// is the time since the peer acknowledged anything, and after a stretch with nothing to
/// send that is the idle time. Chunks go to whichever channel's socket takes them first,
/// so on a link faster than QEMU some channels sit idle for seconds; the first chunk such a
/// channel sent after 1.3 s of rest looked 1.3 s stalled at once, and a healthy channel
/// was failed ("no TCP acknowledgement for 1400 ms", seen in 2 of 10 lab migrations).
/// The watch notes when it first sees data outstanding on a channel and takes the younger
/// of that age and `last_ack_recv`: an idle channel's first send starts a fresh clock, and
/// a channel whose acknowledgements keep coming stays young. It errs by at most one
/// watchdog period (100 ms) towards a later failover, never towards a false one.
///
/// A value with no clock: the watchdog passes the time in. Owned by the watchdog thread.
public struct StallWatch: Sendable {
    /// When data was first seen outstanding on each channel (seconds, the caller's clock).
    private var outstandingSince: [Int: Double] = [:]
    public let limitMilliseconds: UInt32

    public init(limitMilliseconds: UInt32) {
        self.limitMilliseconds = limitMilliseconds
    }

    /// One look at a channel at `now`: returns how long its oldest outstanding byte has
    /// waited (milliseconds) if that is past the limit, nil while it is healthy or idle.
    public mutating func check(channel: Int, unackedSegments: UInt32, millisecondsSinceLastAck: UInt32,
                               now: Double) -> UInt32? {
        guard unackedSegments > 0 else {
            outstandingSince[channel] = nil
            return nil
        }
        let since = outstandingSince[channel] ?? now
        outstandingSince[channel] = since
        let outstandingMs = UInt32(min(Double(UInt32.max), max(0, (now - since) * 1000)))
        let age = min(millisecondsSinceLastAck, outstandingMs)
        return age > limitMilliseconds ? age : nil
    }

    /// Forgets a channel that is gone.
    public mutating func forget(channel: Int) {
        outstandingSince[channel] = nil
    }
}
