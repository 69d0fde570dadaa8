import FerryCompress
import FerryIO
import FerryInterfaces
import FerryQMP
import FerryTransport
import FerryWire

/// What the operator asks of one migration.
public struct MigrationOptions: Sendable {
    public var host: String
    public var port: UInt16
    /// QEMU multifd channels (0: one main stream only; nil: chosen by ``StreamPolicy``).
    /// QEMU's streams are what Ferry carries; more streams let QEMU use more than one
    /// core to send, at a cost in CPU.
    public var multifdChannels: Int?
    /// Data channels (TCP connections) per NIC pair: several, so that more than one core
    /// sends and receives (the RSS idea), and a lost connection costs a fraction of a NIC.
    public var channelsPerEndpoint: Int = 4
    /// This host's NICs that may carry data (default: all).
    public var nics: NICSelection = .all
    /// Link speeds where the kernel reports none (veth), by interface name.
    public var nicSpeeds: [String: UInt64] = [:]
    /// Cap on the migration's rate over all channels, bytes per second (nil: no cap).
    public var bandwidthBytesPerSecond: UInt64?
    /// With every NIC down, wait this long for one to come back before failing.
    public var linkTimeout: Duration = .seconds(10)
    /// A channel with data outstanding and no TCP acknowledgement for this long is dead.
    public var stallTimeout: Duration = .milliseconds(1000)
    /// The longest pause of the guest QEMU may plan for at switchover.
    public var downtimeLimit: Duration = .milliseconds(300)
    /// Give up (VM stays on the source) if the migration has not finished by then.
    public var timeout: Duration = .seconds(600)
    public var connectTimeout: Duration = .seconds(5)
    /// A connection with data unacknowledged by the peer's kernel this long is dead
    /// (TCP_USER_TIMEOUT): how fast a silently dead NIC is detected.
    public var deadChannelTimeout: Duration = .seconds(5)
    /// The cluster keys; the first is proven to the destination. nil: `--insecure`.
    public var keys: KeyRing?
    /// `--compress`: auto chooses by measurement while the migration runs.
    public var compression: CompressionMode = .auto
    /// `--zero-copy auto`: splice chunks from QEMU's socket to the data channels without
    /// copying them into Ferry's memory wherever Ferry need not see the bytes (an unsealed
    /// session with `--compress none`). false (`off`): always read and send them.
    public var zeroCopy = true
    /// `--probe`: the guest's echo service to probe from this host while the VM moves
    /// (``NetworkProbe``); the report says what it saw.
    public var probe: NetworkProbe.Options?
    /// `--cpus`: the cores the data path's threads run on (nil: the default choice).
    public var cpus: CPUSet?
    /// `--converge` and `--max-throttle` (``ConvergencePolicy``).
    /// `auto` by default: the throttle where a guest outpaces the link, postcopy where
    /// allowed (docs/ARCHITECTURE.md, "Convergence").
    public var converge: ConvergeMode = .auto
    public var maxThrottlePercent = 99
    /// `--postcopy`: whether the migration may switch to postcopy.
    public var postcopy: PostcopyPolicy = .never

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }
}

/// A snapshot for the progress display.
public struct MigrationProgress: Sendable {
    public var phase: MigrationPhase
    public var elapsedSeconds: Double
    public var qemu: MigrationInfo?
    public var streamBytes: UInt64
    /// Stream bytes per second over the last interval.
    public var bitsPerSecond: Double
    public var channels: [ChannelStats]
    /// Per-interface rate over the last interval.
    public var interfaceBitsPerSecond: [String: Double]
    public var note: String?
    /// While queued (at this host's outgoing limit or the destination's `--max-migrations`):
    /// the place in line (1 is next) and the line's length.
    public var queuePosition: Int? = nil
    public var queueLength: Int? = nil
    /// The limits Ferry has put on the guest's writes to its disks for their copies to
    /// converge, by guest name (vda: bytes per second); empty when none.
    public var diskWriteLimits: [String: UInt64] = [:]
}

/// How many QEMU streams a migration asks for.
public enum StreamPolicy {
    /// What one QEMU migration thread can fill. Ferry stripes even a single QEMU stream
    /// over every NIC, so multifd is only worth its CPU where one stream cannot keep up.
    /// Measured on the 2-core lab (QEMU 7.2, TCG, 1 GiB guest, 2 x 1 gbit): one stream
    /// 1.59 Gbit/s at 1.5 CPU-s of source QEMU, multifd 2 1.22 Gbit/s at 6.6 CPU-s, multifd
    /// 4 1.22 Gbit/s; QEMU alone over a local socket reached 1.66 Gbit/s with one stream and
    /// 1.55 with multifd 2. The field report puts one TCP stream at 4.5-5 Gbit/s per core;
    /// a Unix socket into Ferry is cheaper, so 10 Gbit/s per stream is the planning figure.
    public static let bitsPerSecondPerStream: UInt64 = 10_000_000_000

    /// One stream (multifd off) when this host's usable NICs add up to at most one
    /// stream's worth; otherwise a multifd channel per 10 Gbit/s (2 to 8). NICs whose
    /// speed the kernel does not report (veth, some virtual NICs) count as nothing: on the
    /// unlimited lab one stream also beat multifd 2 (1.64 against 1.48 Gbit/s).
    public static func multifdChannels(for nics: [NetworkInterface], selection: NICSelection) -> Int {
        let usable = nics.filter { !$0.isLoopback && $0.carrier && selection.allows($0.name) && $0.addresses.contains { !$0.isLinkLocal } }
        let total = usable.reduce(UInt64(0)) { $0 + ($1.speedBitsPerSecond ?? 0) }
        if total <= bitsPerSecondPerStream { return 0 }
        return min(8, max(2, Int((total + bitsPerSecondPerStream - 1) / bitsPerSecondPerStream)))
    }
}

public enum FerryVersion {
    public static let version = "0.1.0"
    public static let software = "ferry \(version)"
}
