import FerryInterfaces
import Foundation

/// One lab and guest configuration the bench measures every mode on.
public struct BenchScenario: Codable, Sendable, Equatable {
    public var name: String
    public var nics: Int
    /// tc rate per NIC ("1gbit"), nil for unlimited veth.
    public var rate: String?
    /// Guest memory the workload fills, MiB.
    public var fillMiB: Int
    /// "random" (incompressible) or "text" (compressible like a server heap).
    public var fill: String
    /// MiB/s the guest keeps rewriting after the fill (0: idle after fill).
    public var dirtyMiBPerSecond: Int
    /// A disk that is copied with the VM (not shared): MiB of incompressible data on it
    /// before the migration (0: no disk). Its virtual size is four times that; the guest
    /// keeps writing 2 MiB/s to it and checks what it wrote.
    public var diskMiB: Int
    /// The disk's virtual size, MiB (nil: four times `diskMiB`).
    public var diskSizeMiB: Int?
    /// MiB/s of 4 KiB checked writes the guest keeps making to its disk (nil: 2).
    public var diskWriteMiBPerSecond: Int?
    /// The modes this scenario runs unless `--modes` says otherwise (nil: ``BenchMode/defaults``).
    public var modes: [BenchMode]? = nil
    /// The longest a migration may take before the bench stops it and counts it as not
    /// completed, seconds (nil: 900).
    public var capSeconds: Int? = nil

    public init(name: String, nics: Int, rate: String?, fillMiB: Int, fill: String, dirtyMiBPerSecond: Int, diskMiB: Int = 0,
                diskSizeMiB: Int? = nil, diskWriteMiBPerSecond: Int? = nil, modes: [BenchMode]? = nil, capSeconds: Int? = nil) {
        self.modes = modes
        self.capSeconds = capSeconds
        self.diskMiB = diskMiB
        self.diskSizeMiB = diskSizeMiB
        self.diskWriteMiBPerSecond = diskWriteMiBPerSecond
        self.name = name
        self.nics = nics
        self.rate = rate
        self.fillMiB = fillMiB
        self.fill = fill
        self.dirtyMiBPerSecond = dirtyMiBPerSecond
    }

    /// Bits per second of one NIC, if limited.
    public var nicBitsPerSecond: Double? {
        rate.flatMap(SpeedList.parseRate).map { Double($0) }
    }

    /// The aggregate line rate of all NICs, if limited.
    public var lineRateBitsPerSecond: Double? { nicBitsPerSecond.map { $0 * Double(nics) } }

    public var summary: String {
        "\(nics) x \(rate ?? "unlimited"), \(fillMiB) MiB \(fill == "random" ? "incompressible" : "compressible") guest, "
            + (dirtyMiBPerSecond == 0 ? "idle after fill" : "dirtying \(dirtyMiBPerSecond) MiB/s")
            + (diskMiB == 0 ? "" : ", a \(virtualDiskMiB / 1024) GiB disk with \(diskMiB) MiB of data, copied (written at \(diskWriteRate) MiB/s)")
    }

    public var virtualDiskMiB: Int { diskSizeMiB ?? diskMiB * 4 }
    public var diskWriteRate: Int { diskWriteMiBPerSecond ?? 2 }

    /// The scenarios `ferry bench` knows by name.
    public static let catalog: [BenchScenario] = [
        BenchScenario(name: "2x1gbit", nics: 2, rate: "1gbit", fillMiB: 1024, fill: "random", dirtyMiBPerSecond: 0),
        BenchScenario(name: "2xunlimited", nics: 2, rate: nil, fillMiB: 1024, fill: "random", dirtyMiBPerSecond: 0),
        BenchScenario(name: "2x1gbit-dirty", nics: 2, rate: "1gbit", fillMiB: 1024, fill: "random", dirtyMiBPerSecond: 16),
        BenchScenario(name: "1x1gbit-text", nics: 1, rate: "1gbit", fillMiB: 1024, fill: "text", dirtyMiBPerSecond: 0),
        BenchScenario(name: "2x1gbit-4g", nics: 2, rate: "1gbit", fillMiB: 4096, fill: "random", dirtyMiBPerSecond: 0),
        BenchScenario(name: "2x1gbit-disk", nics: 2, rate: "1gbit", fillMiB: 512, fill: "random", dirtyMiBPerSecond: 0, diskMiB: 1024),
        // Issue 14's figures: 2 GiB of data in a 4 GiB disk; a guest writing 20 MiB/s to it.
        BenchScenario(name: "2x1gbit-disk2g", nics: 2, rate: "1gbit", fillMiB: 512, fill: "random", dirtyMiBPerSecond: 0,
                      diskMiB: 2048, diskSizeMiB: 4096),
        BenchScenario(name: "2x1gbit-diskwrite", nics: 2, rate: "1gbit", fillMiB: 512, fill: "random", dirtyMiBPerSecond: 0,
                      diskMiB: 1024, diskWriteMiBPerSecond: 20),
        // Issue 17's: a 1 GiB guest rewriting 111 MiB/s of its memory over one 1 gbit NIC,
        // faster than the link carries it. (Under TCG here the guest cannot write that fast;
        // 1x300mbit-hot is the same race at a rate this machine can run.)
        BenchScenario(name: "1x1gbit-hot", nics: 1, rate: "1gbit", fillMiB: 1024, fill: "random", dirtyMiBPerSecond: 111,
                      modes: BenchMode.convergence, capSeconds: 120),
        BenchScenario(name: "1x300mbit-hot", nics: 1, rate: "300mbit", fillMiB: 192, fill: "random", dirtyMiBPerSecond: 4000,
                      modes: BenchMode.convergence, capSeconds: 90),
        // For the test suite: proves the harness, in a minute or two.
        BenchScenario(name: "tiny", nics: 2, rate: nil, fillMiB: 64, fill: "random", dirtyMiBPerSecond: 0),
    ]

    public static let defaults = ["2x1gbit", "2xunlimited"]
}

/// How a migration is carried.
public enum BenchMode: String, Codable, Sendable, CaseIterable {
    /// QEMU alone, one TCP stream (no multifd), to b's address on NIC 0.
    case qemuOneStream = "qemu-1-stream"
    /// QEMU alone, multifd 2 channels, to one address (one NIC).
    case qemuMultifd = "qemu-multifd"
    /// QEMU alone, multifd 2 over an ECMP route with layer-4 hashing (a nexthop per NIC).
    case qemuECMP = "qemu-multifd-ecmp"
    /// QEMU alone, one stream over MPTCP with a subflow per NIC (mptcpize).
    case qemuMPTCP = "qemu-mptcp"
    /// Ferry over one data channel on one NIC.
    case ferryOneChannel = "ferry-1-channel"
    /// Ferry multichannel with `--insecure` on both hosts: what encryption costs.
    case ferryInsecure = "ferry-insecure"
    /// Ferry multichannel with `--compress none`: what automatic compression gains or costs.
    case ferryNoCompression = "ferry-nocompress"
    /// Ferry multichannel, `--insecure --compress none`: chunks spliced through pipes, never
    /// copied through Ferry (zero-copy).
    case ferryZeroCopy = "ferry-zerocopy"
    /// The same with `--zero-copy off`: chunks read into buffers and sent with sendmsg, what
    /// zero-copy saves.
    case ferryCopied = "ferry-copy"
    /// Ferry multichannel with a fixed codec (not in the default set: `--modes` them).
    case ferryLZ4 = "ferry-lz4"
    case ferryZstd = "ferry-zstd"
    /// Ferry with its defaults: every NIC, several channels each, authenticated and encrypted.
    case ferryMultichannel = "ferry"
    /// Ferry with its defaults, one guest moving back and forth: both hosts run `ferry serve`,
    /// and each run is one leg (a to b, then b to a, ...), the guest filled once.
    case ferryPingPong = "ferry-pingpong"

    /// A guest that writes faster than the link (the `-hot` scenarios' modes).
    /// QEMU alone without convergence: it never finishes, and the bench stops it at the
    /// scenario's cap and counts it as not completed.
    case qemuNoConvergence = "qemu-noconverge"
    /// QEMU alone with auto-converge at QEMU's defaults (20% at the start, +10% a pass).
    case qemuAutoConverge = "qemu-autoconverge"
    /// Ferry with `--converge throttle`.
    case ferryThrottle = "ferry-throttle"
    /// Ferry with `--converge postcopy --postcopy allowed`.
    case ferryPostcopy = "ferry-postcopy"

    /// The modes `ferry bench` runs unless told otherwise (a scenario may name its own).
    public static let defaults: [BenchMode] = allCases.filter { $0 != .ferryLZ4 && $0 != .ferryZstd && !convergence.contains($0) }
    /// The modes of a guest that writes faster than the link.
    public static let convergence: [BenchMode] = [.qemuNoConvergence, .qemuAutoConverge, .ferryThrottle, .ferryPostcopy]

    public var isFerry: Bool {
        ![.qemuOneStream, .qemuMultifd, .qemuECMP, .qemuMPTCP, .qemuNoConvergence, .qemuAutoConverge].contains(self)
    }

    /// Modes that migrate without authentication (to b's `--insecure` daemon).
    public var isInsecure: Bool { [.ferryInsecure, .ferryZeroCopy, .ferryCopied].contains(self) }

    public var label: String {
        switch self {
        case .qemuOneStream: "QEMU, one TCP stream, one NIC"
        case .qemuMultifd: "QEMU multifd 2, one address (one NIC)"
        case .qemuECMP: "QEMU multifd 2 over ECMP (L4 hash)"
        case .qemuMPTCP: "QEMU, one stream over MPTCP (subflow per NIC)"
        case .ferryOneChannel: "Ferry, one channel, one NIC"
        case .ferryInsecure: "Ferry multichannel, --insecure (no encryption)"
        case .ferryNoCompression: "Ferry multichannel, --compress none"
        case .ferryZeroCopy: "Ferry multichannel, zero-copy (--insecure --compress none)"
        case .ferryCopied: "Ferry multichannel, copied (--insecure --compress none --zero-copy off)"
        case .ferryLZ4: "Ferry multichannel, --compress lz4"
        case .ferryZstd: "Ferry multichannel, --compress zstd"
        case .ferryMultichannel: "Ferry multichannel (defaults: AES-256-GCM, compress auto)"
        case .ferryPingPong: "Ferry multichannel, ping-pong (one guest, a to b to a ...)"
        case .qemuNoConvergence: "QEMU, one TCP stream, no convergence (stopped at the cap)"
        case .qemuAutoConverge: "QEMU, one TCP stream, auto-converge (QEMU's defaults)"
        case .ferryThrottle: "Ferry, --converge throttle"
        case .ferryPostcopy: "Ferry, --converge postcopy --postcopy allowed"
        }
    }
}
