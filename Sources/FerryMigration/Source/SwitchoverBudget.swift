import FerryTransport
import Foundation

/// How Ferry keeps QEMU's downtime promise (`--downtime`), and pauses the guest for less
/// where the guest allows.
///
/// QEMU stops the guest once it expects to send what is left within its downtime limit, at
/// the bandwidth it sees at its socket. What it counts as sent is still in Ferry's hands:
/// in QEMU's socket buffer and in Ferry's window (up to 32 MiB, 130 ms at 2 Gbit/s), and all
/// of it must cross the link before the destination can load the VM; then come the records,
/// two one-way trips and `cont`. The budget is the target minus the time the window and
/// QEMU's socket buffer take to drain at the link's rate (the NIC pairs' speeds, then the
/// best rate the channels have carried), minus ``commitAllowance``; it holds from the
/// start of the migration. Once QEMU's first pass is done (its second dirty sync: when it
/// ends is not foreseeable, zero pages go by in a flash) Ferry shrinks its window to what
/// the link carries in ``lateWindowSeconds``, and the budget grows by the drain saved.
/// QEMU gets a quarter of the budget up to the end of its first pass, half after its next,
/// then all of it: a guest that dirties little is stopped with little left (one more pass
/// costs a fraction of a second), one that dirties much gets the whole budget two passes
/// later. A value; no clock.
struct SwitchoverBudget: Equatable {
    /// The late window: this long at the link's rate, at least ``minimumLateWindow``.
    static let lateWindowSeconds = 0.02
    static let minimumLateWindow = 2 << 20
    /// The switchover's own steps after the last byte is loaded: two durable records,
    /// two one-way trips, `cont` (measured at 2-6 ms in the lab; room for real disks).
    static let commitAllowance = 0.02
    /// QEMU never gets less than this share of the target (a link too slow for the
    /// promise still converges; the report then shows the pause it got).
    static let minimumShare = 0.1
    /// The budget's share QEMU gets after its dirty sync number `sync` (2: the first
    /// pass done).
    static func share(afterSync sync: UInt64) -> Double {
        min(1, 0.25 * Double(1 << min(4, Int(max(2, sync)) - 2)))
    }

    /// The window from now on, in bytes.
    let window: Int
    /// What QEMU is told its downtime limit is, in milliseconds.
    let qemuLimitMilliseconds: Int
    /// The time the window and QEMU's socket buffer take to cross the link.
    let drainMilliseconds: Double

    /// The whole budget (before the share) in milliseconds.
    let budgetMilliseconds: Double

    /// `late`: QEMU's first pass is done, and the window shrinks.
    init(targetMilliseconds: Int, rateBytesPerSecond: Double, fullWindow: Int, qemuBufferedBytes: Int, share: Double = 1,
         late: Bool = true) {
        let rate = max(rateBytesPerSecond, 1)
        window = late ? min(fullWindow, max(Self.minimumLateWindow, Int(rate * Self.lateWindowSeconds))) : fullWindow
        drainMilliseconds = Double(window + qemuBufferedBytes) / rate * 1000
        budgetMilliseconds = Double(targetMilliseconds) - drainMilliseconds - Self.commitAllowance * 1000
        qemuLimitMilliseconds = max(1, Int(max(budgetMilliseconds * share, Double(targetMilliseconds) * Self.minimumShare).rounded(.down)))
    }

    /// The window a transfer starts with: 64 ms of the NIC pairs' speeds together, between
    /// 8 and 32 MiB (32 MiB where a speed is unknown). It bounds what is still to cross the
    /// link when QEMU stops the guest at the end of its first pass, which nobody can see
    /// coming. Measured on 2 x 1 gbit (`ferry bench --scenario 2x1gbit`, 3 runs each): a
    /// 32 MiB window paused the guest for 299 ms at the median, 16 MiB for 45 ms, 8 MiB
    /// for 56 ms, for 0.94, 0.88 and 0.83 of line rate while the memory streamed.
    static func startingWindow(linkBitsPerSecond: UInt64?) -> Int {
        guard let link = linkBitsPerSecond, link > 0 else { return ChunkPolicy.windowByteCount }
        return min(ChunkPolicy.windowByteCount, max(8 << 20, Int(Double(link) / 8 * 0.064)))
    }

    /// Bytes QEMU may have written that Ferry has not yet read: its socket buffer (a
    /// socket pair of 4 MiB with one stream; the default ~208 KiB per multifd stream).
    static func qemuBufferedBytes(streamCount: Int) -> Int {
        streamCount == 1 ? ChunkPolicy.qemuSocketBufferByteCount : streamCount * (256 << 10)
    }
}
