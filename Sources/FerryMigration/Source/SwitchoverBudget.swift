import FerryTransport
import Foundation

/// How Ferry keeps QEMU's downtime promise (`--downtime`), and pauses the guest for less
/// where the guest allows.
///
/// QEMU stops the guest once it expects to send what is left within its downtime limit, at
/// the bandwidth it sees at its socket. What it counts as sent is still in Ferry's hands:
/// in QEMU's socket buffer and in Ferry's window (up to 32 MiB, 130 ms at 2 Gbit/s), and all
/// of it must cross the link before the destination can load the VM; then come the records,
/// two one-way trips and `cont`.
///
/// So QEMU's downtime limit is held low through its first pass: at the pass's end (which
/// nobody can see coming: zero pages go by in a flash) the window is full, and QEMU, unable
/// to stop with anything left, makes another pass, whose pages wait behind the window; the
/// window drains while the guest still runs. Not 0: QEMU 7.2 syncs its dirty bitmap only
/// when what is left falls below its threshold (bandwidth x limit), and with a limit of 0
/// it never does, so at the first pass's end it sees nothing left and completes, syncing
/// only then, and the pause carries everything the guest dirtied during the first pass
/// (2.2 s for a guest dirtying 20 MiB/s over 200 Mbit/s, against 253 ms held at 1 ms).
/// Held at 1 ms for every migration since session 13 (``heldLimitMilliseconds``; session
/// 12 held it there only with `--converge`, after one CI run failed
/// `DiskTests.killedWhileCopying` under load with it: the destination stopped its NBD
/// server while the disk copy's last bytes, the source's disconnect, were still on their
/// way, and their write failed the session; it now waits for them). Once Ferry sees the first pass done (QEMU's second dirty sync) it
/// shrinks the window to what the link carries in ``lateWindowSeconds`` and gives QEMU the
/// budget: the target minus the time that window and QEMU's socket buffer take to drain at
/// the best rate the channels have carried (or the NIC pairs' speeds), minus
/// ``commitAllowance``; a quarter of it at first, half after the next pass, then all. A
/// guest that dirties little is stopped with little left (the extra passes cost a fraction
/// of a second); one that dirties much gets the whole budget two passes later. A value; no
/// clock.
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
    /// The downtime limit QEMU has from `migrate` until its first pass is done: the least
    /// above none, so that QEMU syncs its dirty bitmap and makes more passes (and its
    /// auto-converge can see them).
    static let heldLimitMilliseconds = 1

    /// The budget's share QEMU gets after its dirty sync number `sync` (2: the first pass
    /// done, a quarter; then a half; from the fourth on, all of it).
    static func share(afterSync sync: UInt64) -> Double {
        min(1, 0.25 * Double(1 << min(4, max(0, Int(sync) - 2))))
    }

    /// The window from now on (the late window), in bytes.
    let window: Int
    /// What QEMU is told its downtime limit is, in milliseconds.
    let qemuLimitMilliseconds: Int
    /// The time the window and QEMU's socket buffer take to cross the link.
    let drainMilliseconds: Double

    /// The whole budget (before the share) in milliseconds.
    let budgetMilliseconds: Double

    init(targetMilliseconds: Int, rateBytesPerSecond: Double, fullWindow: Int, qemuBufferedBytes: Int, share: Double = 1) {
        let rate = max(rateBytesPerSecond, 1)
        window = Self.lateWindow(rateBytesPerSecond: rate, fullWindow: fullWindow)
        drainMilliseconds = Double(window + qemuBufferedBytes) / rate * 1000
        budgetMilliseconds = Double(targetMilliseconds) - drainMilliseconds - Self.commitAllowance * 1000
        qemuLimitMilliseconds = max(1, Int(max(budgetMilliseconds * share, Double(targetMilliseconds) * Self.minimumShare).rounded(.down)))
    }

    /// Whether QEMU stays held at ``heldLimitMilliseconds`` while `outstanding` bytes (what
    /// the first pass left in Ferry's window) are still to cross: a stop now would pause
    /// the guest for all of them.
    func holds(outstanding: Int) -> Bool { outstanding > window }

    /// How long before the first pass's end its tail begins: QEMU's `remaining` below what
    /// the link carries in this time (its pages with data; zero pages go faster).
    static let tailSeconds = 0.5
    static let longestTailSeconds = 2.0

    /// The window for the first pass's tail, or nil while the tail has not begun. Once
    /// `remainingBytes` of the pass are less than ``tailSeconds`` of the link, the window
    /// becomes the late window: if the guest dirtied so little that QEMU stops at the
    /// pass's end, only that much waits in Ferry's buffers through the pause (the outliers
    /// of the 2 x 1 gbit bench were 260-340 ms of draining a 16 MiB window after the stop).
    /// Half a second of the link at the smaller window costs the pass little: the window
    /// still covers the link's bandwidth-delay product many times over.
    static func tailWindow(remainingBytes: UInt64, totalBytes: UInt64 = 0, rateBytesPerSecond: Double, fullWindow: Int) -> Int? {
        // Zero pages leave `remaining` in leaps (they take no time to send), so a pass can
        // end between two looks: the tail starts at a quarter of the RAM left, up to
        // ``longestTailSeconds`` of the link, or at ``tailSeconds`` of it, whichever is more.
        let tail = max(rateBytesPerSecond * tailSeconds, min(Double(totalBytes) / 4, rateBytesPerSecond * longestTailSeconds))
        guard remainingBytes > 0, Double(remainingBytes) < tail else { return nil }
        return lateWindow(rateBytesPerSecond: rateBytesPerSecond, fullWindow: fullWindow)
    }

    /// ``lateWindowSeconds`` of the link, at least ``minimumLateWindow``, at most the full window.
    static func lateWindow(rateBytesPerSecond: Double, fullWindow: Int) -> Int {
        min(fullWindow, max(minimumLateWindow, Int(rateBytesPerSecond * lateWindowSeconds)))
    }

    /// The window a transfer starts with: 64 ms of the NIC pairs' speeds together, between
    /// 16 and 32 MiB (32 MiB where a speed is unknown). When QEMU's first pass is also its
    /// last (a guest that dirties nothing stops with nothing pending, whatever its limit),
    /// what the window holds then is part of the pause. Measured on 2 x 1 gbit
    /// (`ferry bench --scenario 2x1gbit`, 3 runs each): 32 MiB paused the guest for 299 ms
    /// at the median, 16 MiB for 45 ms, 8 MiB for 56 ms, at 0.94, 0.88 and 0.83 of line
    /// rate while the memory streamed. Below 16 MiB, NICs of unequal speed are no longer
    /// filled in proportion (160 and 80 Mbit/s with 8 MiB: an even split, 171 Mbit/s in
    /// all): chunks go to whichever channel's socket takes them, and a small window never
    /// fills the fast NIC's sockets ahead of the slow one's.
    static func startingWindow(linkBitsPerSecond: UInt64?) -> Int {
        guard let link = linkBitsPerSecond, link > 0 else { return ChunkPolicy.windowByteCount }
        return min(ChunkPolicy.windowByteCount, max(16 << 20, Int(Double(link) / 8 * 0.064)))
    }

    /// Bytes QEMU may have written that Ferry has not yet read: its socket buffer (a
    /// socket pair of 4 MiB with one stream; the default ~208 KiB per multifd stream).
    static func qemuBufferedBytes(streamCount: Int) -> Int {
        streamCount == 1 ? ChunkPolicy.qemuSocketBufferByteCount : streamCount * (256 << 10)
    }
}
