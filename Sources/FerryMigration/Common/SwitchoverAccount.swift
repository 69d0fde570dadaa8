import FerryWire
import Foundation

/// The source's moments of the switchover, in seconds since the epoch by its clock
/// (QEMU's event timestamps where QEMU says).
struct SourceSwitchoverTimes: Sendable, Equatable {
    /// QEMU's STOP: the guest's pause begins.
    var stop: Double?
    /// The disk copies were completed and QEMU told to go on (only with disks copied).
    var disksFinished: Double?
    /// QEMU's MIGRATION event `completed`: it has written everything into Ferry's socket.
    var completed: Double?
    /// The destination's `loaded` reached the migration's thread.
    var loadedReceived: Double?
    /// The commit step began (everything acknowledged)...
    var commitStarted: Double?
    /// ...its record was durable...
    var commitRecorded: Double?
    /// ...and `commit` went out.
    var commitSent: Double?
    /// `committed` came back.
    var committedReceived: Double?
}

/// Where the guest's pause went: from QEMU's STOP on the source to its RESUME on the
/// destination, cut at every step both sides took, in the order they take them. A pure
/// function of both sides' moments.
///
/// The two hosts' clocks need not agree: the destination's moments are moved onto the
/// source's clock by the offset the commit's round trip shows (as NTP estimates it: the
/// mean of the two one-way differences), which is exact when the two one-way delays are
/// equal and off by half their difference otherwise (tens of microseconds on a LAN).
enum SwitchoverAccount {
    static func make(source s: SourceSwitchoverTimes, destination d: DestinationSwitchoverTimes) -> MigrationReport.Pause? {
        guard let commitSent = s.commitSent, let committedReceived = s.committedReceived,
              let commitReceived = d.commitReceived, let committedSent = d.committedSent else { return nil }
        // Destination clock minus source clock; within half the round trip of zero it is
        // indistinguishable from zero (the estimate's own error), and the clocks agree.
        let estimate = ((commitReceived - commitSent) + (committedSent - committedReceived)) / 2
        let roundTrip = (committedReceived - commitSent) - (committedSent - commitReceived)
        let offset = abs(estimate) <= max(0, roundTrip) / 2 ? 0 : estimate
        func local(_ t: Double?) -> Double? { t.map { $0 - offset } }
        // With disks copied, QEMU waits at its STOP until Ferry has completed the copies.
        let disks: [(String, Double?)] = s.disksFinished == nil ? [] : [("the disk copies' last writes", s.stop)]
        let milestones: [(String, Double?)] = disks + [
            ("QEMU's final pass", s.disksFinished ?? s.stop),
            ("Ferry's buffers and the wire", s.completed),
            ("destination QEMU's load", local(d.lastByte)),
            ("destination sees it loaded", local(d.loaded)),
            ("prepared record", local(d.prepareStarted)),
            ("loaded to the source", local(d.prepared)),
            ("source sees it loaded", s.loadedReceived),
            ("commit record", s.commitStarted),
            ("commit to the destination", s.commitRecorded),
            ("committed record", local(d.commitReceived)),
            ("taps join the bridge", d.tapsConnected == nil ? nil : local(d.committedRecorded)),
            ("cont", local(d.tapsConnected ?? d.committedRecorded)),
            ("", local(d.resumed)),
        ]
        guard let start = s.stop, let end = local(d.resumed) else { return nil }
        // Each segment runs from its milestone to the next one known; an unknown
        // milestone's time falls to the segment before it.
        var segments: [MigrationReport.Pause.Segment] = []
        var index = 0
        while index < milestones.count - 1 {
            guard let from = milestones[index].1 else {
                index += 1
                continue
            }
            var next = index + 1
            while next < milestones.count - 1 && milestones[next].1 == nil { next += 1 }
            guard let to = milestones[next].1 else { break }
            segments.append(.init(name: milestones[index].0, milliseconds: (to - from) * 1000))
            index = next
        }
        return MigrationReport.Pause(guestPauseMilliseconds: (end - start) * 1000, clockOffsetMilliseconds: offset * 1000,
                                     segments: segments)
    }
}
