import Crypto
import Foundation

/// Protocol versions this build speaks. A peer offers a range in `hello`; the destination
/// picks the highest version both speak. Policy: a release accepts the current and the
/// previous protocol version (see docs/PROTOCOL.md, "Versioning").
public enum ProtocolVersion {
    public static let current: UInt16 = 8
    public static let oldestSupported: UInt16 = 1
    /// The first version whose control connection can move to another connection
    /// (`rejoin`, `rejoined`, `received`; docs/PROTOCOL.md, "The control connection moves").
    public static let movableControl: UInt16 = 2
    /// The first version with two-way streams: a stream carries bytes both ways, each half
    /// closed on its own, with a kind and a priority (docs/PROTOCOL.md, "Two-way streams").
    /// A migration that needs one (a disk copy) refuses a peer that chose an older version.
    public static let twoWayStreams: UInt16 = 3
    /// The first version whose VM spec carries guest NICs (``VMSpec/nics``). A migration of
    /// a VM with a NIC refuses a peer that chose an older version, which would drop them.
    public static let guestNICs: UInt16 = 4
    /// The first version that answers `hostQuery` with `hostInfo` (what a host has room
    /// for, its load, its NICs, whether it is draining): `ferry drain` needs it to place
    /// VMs and refuses a destination that chose an older version.
    public static let hostQueries: UInt16 = 5
    /// The first version that carries postcopy: ``StreamPlan/postcopy`` (QEMU's main
    /// stream and its preempt channel, both two-way), `loaded` with ``LoadedMessage/postcopy``
    /// and `postcopyDone`. A migration that may switch to postcopy refuses (or, under
    /// `--converge auto`, goes without postcopy with) a peer that chose an older version.
    public static let postcopy: UInt16 = 6
    /// The first version that resumes a postcopy migration whose session was lost with a
    /// daemon (``OfferMessage/resumeSession``): the destination QEMU listens again
    /// (`migrate-recover`) and the source QEMU sends the rest (`migrate` with `resume`).
    /// A source never offers a resume to a peer that chose an older version.
    public static let postcopyResume: UInt16 = 7
    /// The first version that carries a libvirt domain's migration (`libvirtOffer`, streams
    /// of kind `libvirt`): libvirt runs it, Ferry carries its connections. A source never
    /// offers one to a peer that chose an older version.
    public static let libvirt: UInt16 = 8

    /// The highest version this process offers: ``current``, or lower for tests of mixed
    /// clusters (`FERRY_PROTOCOL_MAX`, never above ``current``).
    public static var offered: UInt16 {
        guard let text = ProcessInfo.processInfo.environment["FERRY_PROTOCOL_MAX"], let v = UInt16(text) else { return current }
        return max(oldestSupported, min(current, v))
    }

    /// The version both sides speak, or nil.
    public static func negotiate(peerMin: UInt16, peerMax: UInt16) -> UInt16? {
        let high = min(peerMax, offered)
        let low = max(peerMin, oldestSupported)
        return high >= low ? high : nil
    }
}

/// Error codes that cross the wire. 0 is reserved as invalid.
public enum ErrorCode: UInt16, Codable, Sendable, CustomStringConvertible {
    case invalid = 0
    case protocolViolation = 1
    case unsupportedVersion = 2
    case vmExists = 3
    case badOffer = 4
    case fileMismatch = 5
    case qemuFailed = 6
    case busy = 7
    case internalError = 8
    case aborted = 9
    case authenticationFailed = 10
    case unknownSession = 11
    case timeout = 12

    public var description: String {
        switch self {
        case .invalid: "invalid"
        case .protocolViolation: "protocol-violation"
        case .unsupportedVersion: "unsupported-version"
        case .vmExists: "vm-exists"
        case .badOffer: "bad-offer"
        case .fileMismatch: "file-mismatch"
        case .qemuFailed: "qemu-failed"
        case .busy: "busy"
        case .internalError: "internal-error"
        case .aborted: "aborted"
        case .authenticationFailed: "authentication-failed"
        case .unknownSession: "unknown-session"
        case .timeout: "timeout"
        }
    }
}

/// The accelerator a VM runs under.
public enum Accelerator: String, Codable, Sendable, CaseIterable {
    case kvm, tcg
}

/// What defines a VM: enough for any host to start an identical QEMU to receive it.
public struct VMSpec: Codable, Equatable, Sendable {
    public var name: String
    public var memoryMiB: Int
    public var cpus: Int
    /// The kernel QEMU boots (with `initrd` and `append`); nil: the VM boots from its first
    /// disk, as a BIOS would (`vm run --boot disk`).
    public var kernel: BootFile?
    public var initrd: BootFile?
    public var append: String
    public var accelerator: Accelerator
    /// The concrete, versioned machine type (e.g. `pc-i440fx-7.2`), so that both ends
    /// emulate the same hardware even if their QEMU default aliases differ.
    public var machine: String
    public var cpuModel: String
    /// KiB added to the guest RAM beyond `memoryMiB` (see `QEMU.tcgDirtyTrackingPadKiB`).
    /// Part of the spec because both ends must give QEMU the same RAM size.
    public var ramPadKiB: Int
    /// The VM's disks, in the order the guest sees them (vda, vdb, ...). A peer that does
    /// not know this field would drop the disks: a source sends a spec with disks only to
    /// a destination that chose protocol 3 or later (``ProtocolVersion/twoWayStreams``).
    public var disks: [DiskSpec]
    /// The VM's NICs, in the order the guest sees them (eth0, eth1, ...). Sent only to a
    /// destination that chose protocol 4 or later (``ProtocolVersion/guestNICs``).
    public var nics: [NICSpec]

    public init(name: String, memoryMiB: Int, cpus: Int, kernel: BootFile?, initrd: BootFile?,
                append: String, accelerator: Accelerator, machine: String, cpuModel: String, ramPadKiB: Int = 0,
                disks: [DiskSpec] = [], nics: [NICSpec] = []) {
        self.ramPadKiB = ramPadKiB
        self.disks = disks
        self.nics = nics
        self.name = name
        self.memoryMiB = memoryMiB
        self.cpus = cpus
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.accelerator = accelerator
        self.machine = machine
        self.cpuModel = cpuModel
    }

    public var bootFiles: [BootFile] { [kernel, initrd].compactMap { $0 } }

    /// What is wrong with how this VM boots, or nil: a kernel (its initrd and command line
    /// with it), or else the first disk, which then needs to exist.
    public var bootProblem: String? {
        guard kernel == nil else { return nil }
        if disks.isEmpty { return "has nothing to boot: no kernel and no disk" }
        if initrd != nil || !append.isEmpty { return "has an initrd or a kernel command line but no kernel" }
        return nil
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        memoryMiB = try c.decode(Int.self, forKey: .memoryMiB)
        cpus = try c.decode(Int.self, forKey: .cpus)
        kernel = try c.decodeIfPresent(BootFile.self, forKey: .kernel)
        initrd = try c.decodeIfPresent(BootFile.self, forKey: .initrd)
        append = try c.decode(String.self, forKey: .append)
        accelerator = try c.decode(Accelerator.self, forKey: .accelerator)
        machine = try c.decode(String.self, forKey: .machine)
        cpuModel = try c.decode(String.self, forKey: .cpuModel)
        ramPadKiB = try c.decodeIfPresent(Int.self, forKey: .ramPadKiB) ?? 0
        disks = try c.decodeIfPresent([DiskSpec].self, forKey: .disks) ?? []
        nics = try c.decodeIfPresent([NICSpec].self, forKey: .nics) ?? []
    }

    /// VM names are used as directory names and QEMU ids: keep them to a safe alphabet.
    public static func validateName(_ name: String) -> String? {
        if name.isEmpty { return "the VM name is empty" }
        if name.count > 64 { return "the VM name is longer than 64 characters" }
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
        if name.first == "." || name.first == "-" { return "the VM name must not start with '.' or '-'" }
        if !name.allSatisfy({ allowed.contains($0) }) {
            return "the VM name '\(name)' may only contain letters, digits, '-', '_' and '.'"
        }
        return nil
    }
}

/// A disk image's format, as `qemu-img info` names it. Recorded when the VM starts and
/// passed to QEMU explicitly, never probed again (a raw image whose guest wrote a qcow2
/// header must not turn into a qcow2 image).
public enum DiskFormat: String, Codable, Sendable, CaseIterable {
    case raw, qcow2
}

/// One disk of a VM: an image file, attached as a virtio-blk device.
public struct DiskSpec: Codable, Equatable, Sendable {
    /// The image on the host the VM runs on (absolute).
    public var path: String
    public var format: DiskFormat
    /// The size the guest sees, bytes.
    public var virtualSizeBytes: UInt64
    /// The same file is reachable at `path` on every host (NFS, a cluster filesystem):
    /// never copied; proved to be the same file before a migration moves anything.
    public var shared: Bool

    public init(path: String, format: DiskFormat, virtualSizeBytes: UInt64, shared: Bool) {
        self.path = path
        self.format = format
        self.virtualSizeBytes = virtualSizeBytes
        self.shared = shared
    }

    /// The guest's name for disk `index` (vda, vdb, ..., vdz, vdaa, ...).
    public static func guestName(_ index: Int) -> String {
        let letters = Array("abcdefghijklmnopqrstuvwxyz")
        var n = index, name = ""
        repeat {
            name = String(letters[n % 26]) + name
            n = n / 26 - 1
        } while n >= 0
        return "vd" + name
    }
}

/// One NIC of a VM: a QEMU network device whose backend is a tap on the host bridge
/// `bridge`, which every host the VM runs on has (the VM's network).
public struct NICSpec: Codable, Equatable, Sendable {
    /// The host bridge the NIC's tap joins (the same name on every host).
    public var bridge: String
    /// The guest's MAC address, lowercase, colon-separated ("52:54:00:12:34:56").
    public var mac: String
    /// QEMU's device model (e.g. `virtio-net-pci`), as QEMU names it.
    public var model: String

    public init(bridge: String, mac: String, model: String) {
        self.bridge = bridge
        self.mac = mac
        self.model = model
    }

    /// The tap's name on the host: "fy" and the MAC's twelve hex digits (14 characters,
    /// within Linux's 15). A MAC is unique among a host's VMs, so is its tap's name.
    public var tapName: String { "fy" + mac.replacingOccurrences(of: ":", with: "") }

    /// The MAC in Ferry's form (lowercase, colons), or nil if `text` is not six hex octets
    /// separated by ':' or '-', or names a group (multicast) or the zero address.
    public static func normalizedMAC(_ text: String) -> String? {
        let parts = text.split(separator: text.contains("-") ? "-" : ":", omittingEmptySubsequences: false)
        guard parts.count == 6, parts.allSatisfy({ $0.count == 2 }) else { return nil }
        let octets = parts.compactMap { UInt8($0, radix: 16) }
        guard octets.count == 6, octets[0] & 1 == 0, octets.contains(where: { $0 != 0 }) else { return nil }
        return octets.map { String(format: "%02x", $0) }.joined(separator: ":")
    }

    /// A bridge name Linux takes (1-15 characters, no '/', ':' or white space, not '.' or '..').
    public static func validBridgeName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 15 && name != "." && name != ".."
            && !name.contains(where: { $0 == "/" || $0 == ":" || $0.isWhitespace })
    }
}

/// A boot file (kernel or initrd), identified by content.
public struct BootFile: Codable, Equatable, Sendable {
    public var name: String
    public var byteCount: Int64
    /// Lowercase hex SHA-256 of the content.
    public var sha256: String
    public init(name: String, byteCount: Int64, sha256: String) {
        self.name = name
        self.byteCount = byteCount
        self.sha256 = sha256
    }
}

// MARK: - Control messages (JSON payloads)

public struct HelloMessage: Codable, Equatable, Sendable {
    public var minVersion: UInt16
    public var maxVersion: UInt16
    public var software: String
    public var host: String
    /// The source's key id and nonce; nil from a source run with `--insecure`.
    public var auth: AuthOffer?
    public init(minVersion: UInt16 = ProtocolVersion.oldestSupported, maxVersion: UInt16 = ProtocolVersion.offered,
                software: String, host: String, auth: AuthOffer? = nil) {
        self.minVersion = minVersion
        self.maxVersion = maxVersion
        self.software = software
        self.host = host
        self.auth = auth
    }
}

public struct WelcomeMessage: Codable, Equatable, Sendable {
    public var version: UInt16
    public var software: String
    public var host: String
    /// The destination's nonce and proof of the key; nil from a host run with `--insecure`.
    public var auth: AuthReply?
    /// Why this host cannot be a postcopy destination (no userfaultfd for QEMU); nil if it
    /// can, or from a peer that does not say (older than this field: its refusal of the
    /// offer says it then). A source that may, but need not, switch to postcopy goes
    /// without it.
    public var postcopyProblem: String?
    public init(version: UInt16, software: String, host: String, auth: AuthReply? = nil, postcopyProblem: String? = nil) {
        self.postcopyProblem = postcopyProblem
        self.version = version
        self.software = software
        self.host = host
        self.auth = auth
    }
}

public struct ErrorMessage: Codable, Equatable, Sendable, Error, CustomStringConvertible {
    public var code: ErrorCode
    public var message: String
    public init(code: ErrorCode, message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { "\(message) [\(code)]" }
}

/// QEMU migration settings both ends must agree on.
public struct StreamPlan: Codable, Equatable, Sendable {
    /// Number of multifd channels (0: multifd off, one main stream only).
    public var multifdChannels: Int
    /// Protocol v6: QEMU's postcopy is on in both QEMUs (`postcopy-ram` and
    /// `postcopy-preempt`), so the migration may switch to it. Its streams are the main
    /// channel, which carries the destination's page requests back (QEMU's return path), and
    /// the preempt channel, which carries the requested pages ahead of the rest: both
    /// two-way, connected at the destination in that order as soon as they open. Multifd is
    /// off (QEMU 7.2 cannot combine the two).
    public var postcopy: Bool?
    public init(multifdChannels: Int, postcopy: Bool = false) {
        self.multifdChannels = postcopy ? 0 : multifdChannels
        self.postcopy = postcopy ? true : nil
    }
    public var isPostcopy: Bool { postcopy == true }
    /// Streams QEMU opens: the main channel plus one per multifd channel, or the main
    /// channel and the preempt channel.
    public var streamCount: Int { isPostcopy ? 2 : 1 + multifdChannels }
    /// The preempt channel's stream number.
    public static let preemptStream: UInt32 = 1
}

public struct OfferMessage: Codable, Equatable, Sendable {
    public var spec: VMSpec
    public var streams: StreamPlan
    public var sourceHost: String
    /// The port of the source host's own daemon, where the destination asks for the
    /// switchover's decision if the two lose each other (nil: the default, 7470).
    public var sourcePort: UInt16?
    /// Protocol v2: how long the source tries to bring a lost control connection back
    /// (its `--link-timeout`); the destination waits a little longer before it gives up.
    public var linkTimeoutSeconds: Double?
    /// Protocol v3, one per disk of `spec` (nil for a disk that is not shared): the token
    /// the source has just written beside the shared image (``SharedDiskToken``). The
    /// destination reads it at the same path: the same token proves the same file.
    public var sharedDiskTokens: [String?]?
    /// Protocol v3, one per disk of `spec`: the bytes its image takes on the source's
    /// filesystem now (what a copy will need, at least; the destination checks its room).
    public var diskAllocatedBytes: [UInt64]?
    /// Protocol v7: not a new migration but the rest of one that committed into postcopy
    /// in this session (the session id of its handover record), whose session a daemon's
    /// crash ended. The destination runs the VM already; its QEMU is to take the rest.
    public var resumeSession: String?
    public init(spec: VMSpec, streams: StreamPlan, sourceHost: String, sourcePort: UInt16? = nil, linkTimeoutSeconds: Double? = nil,
                sharedDiskTokens: [String?]? = nil, diskAllocatedBytes: [UInt64]? = nil, resumeSession: String? = nil) {
        self.resumeSession = resumeSession
        self.sharedDiskTokens = sharedDiskTokens
        self.diskAllocatedBytes = diskAllocatedBytes
        self.spec = spec
        self.streams = streams
        self.sourceHost = sourceHost
        self.sourcePort = sourcePort
        self.linkTimeoutSeconds = linkTimeoutSeconds
    }
}

/// Settles a switchover that a crash left unsettled. The asking host names the session and
/// the VM and, if it is the source, its decision (`commit`, or `abort` when it never
/// decided); a destination asks with no decision.
public struct ResolveMessage: Codable, Equatable, Sendable {
    /// What a source tells its destination it decided. On the wire as its raw value; a
    /// value this host does not know fails decoding, so the request is refused, never
    /// read as a question.
    public enum Decision: String, Codable, Sendable {
        case commit
        case abort
    }
    public var session: String
    public var vm: String
    /// The source's decision; nil from a destination asking what the source decided.
    public var decision: Decision?
    public init(session: String, vm: String, decision: Decision?) {
        self.session = session
        self.vm = vm
        self.decision = decision
    }
}

/// The answer to ``ResolveMessage``: what the answering host knows of the session.
public struct ResolvedMessage: Codable, Equatable, Sendable {
    public enum State: String, Codable, Sendable {
        /// (Answering source) it decided to commit: the destination runs the VM.
        case commit
        /// (Answering source) it never decided to commit and never will (its migration
        /// process is gone): the destination discards its copy.
        case abort
        /// (Answering source) its migration is still running: ask again later.
        case pending
        /// (Answering destination) the VM runs here (it has committed).
        case running
        /// (Answering destination) it has no copy of the VM for this session and will
        /// never run one: the source may resume its own.
        case gone
    }
    public var state: State
    public var detail: String
    public init(state: State, detail: String) {
        self.state = state
        self.detail = detail
    }
}

/// Protocol v5: asks a daemon about its host (``HostInfoMessage``). Sent instead of an
/// offer, after the handshake, on a connection of its own.
public struct HostQueryMessage: Codable, Equatable, Sendable {
    /// Why the peer asks ("drain"), for the daemon's log.
    public var purpose: String
    public init(purpose: String) { self.purpose = purpose }
}

/// Protocol v5: what a host has room for, as `ferry drain` places VMs by it.
public struct HostInfoMessage: Codable, Equatable, Sendable {
    public var host: String
    /// Guest memory this host can still take, bytes: the least of the memory the kernel
    /// says is available (MemAvailable), the free space where guest RAM lives (the memory
    /// directory), and what `--max-guest-memory` leaves; each less a reserve for the host.
    public var freeGuestMemoryBytes: UInt64
    /// Guest memory of the VMs here now (running, paused or arriving), bytes.
    public var guestMemoryBytes: UInt64
    /// `ferry serve --max-guest-memory`, if set.
    public var maxGuestMemoryBytes: UInt64?
    /// The names of the VMs here: a VM of the same name cannot move in.
    public var vms: [String]
    /// Load average over a minute, and the CPUs it is shared by.
    public var loadAverage: Double
    public var cpus: Int
    /// Incoming migrations transferring now, waiting, and the limit (`--max-migrations`).
    public var runningMigrations: Int
    public var queuedMigrations: Int
    public var maxMigrations: Int
    /// The host is draining (`ferry drain`): it refuses incoming migrations.
    public var draining: Bool
    /// Its migration NICs (those it listens on).
    public var interfaces: [InterfaceMessage]
    public init(host: String, freeGuestMemoryBytes: UInt64, guestMemoryBytes: UInt64, maxGuestMemoryBytes: UInt64?, vms: [String],
                loadAverage: Double, cpus: Int, runningMigrations: Int, queuedMigrations: Int, maxMigrations: Int,
                draining: Bool, interfaces: [InterfaceMessage]) {
        self.host = host
        self.freeGuestMemoryBytes = freeGuestMemoryBytes
        self.guestMemoryBytes = guestMemoryBytes
        self.maxGuestMemoryBytes = maxGuestMemoryBytes
        self.vms = vms
        self.loadAverage = loadAverage
        self.cpus = cpus
        self.runningMigrations = runningMigrations
        self.queuedMigrations = queuedMigrations
        self.maxMigrations = maxMigrations
        self.draining = draining
        self.interfaces = interfaces
    }
}

/// A destination NIC, as interface discovery reports it (SMB's NETWORK_INTERFACE_INFO).
public struct InterfaceMessage: Codable, Equatable, Sendable {
    public var name: String
    /// "address/prefix", IPv4 or IPv6.
    public var addresses: [String]
    public var speedBitsPerSecond: UInt64?
    public var mtu: Int
    public var carrier: Bool
    public init(name: String, addresses: [String], speedBitsPerSecond: UInt64?, mtu: Int, carrier: Bool) {
        self.name = name
        self.addresses = addresses
        self.speedBitsPerSecond = speedBitsPerSecond
        self.mtu = mtu
        self.carrier = carrier
    }
}

public struct AcceptMessage: Codable, Equatable, Sendable {
    /// 16 random bytes, hex: names the session in `bind`.
    public var session: String
    /// Insecure sessions only: 32 random bytes, hex, the key a data channel proves
    /// knowledge of when it binds. Empty in authenticated sessions, where the bind key is
    /// derived from the cluster key and never sent (``SessionKeys``).
    public var bindKey: String
    /// SHA-256 of each boot file the destination does not have and wants sent.
    public var missingFiles: [String]
    /// The destination's NICs (interface discovery); the source pairs them with its own.
    /// With no pair, the source opens its channels to the control connection's address.
    public var interfaces: [InterfaceMessage]
    /// The port data channels connect to, on any of `interfaces`.
    public var dataPort: UInt16
    /// Protocol v3, one per disk of the offer's spec: where the destination keeps it (the
    /// same path for a shared disk; the image it created for a copied one).
    public var diskPaths: [String]?
    public init(session: String, bindKey: String, missingFiles: [String],
                interfaces: [InterfaceMessage] = [], dataPort: UInt16 = 0, diskPaths: [String]? = nil) {
        self.diskPaths = diskPaths
        self.session = session
        self.bindKey = bindKey
        self.missingFiles = missingFiles
        self.interfaces = interfaces
        self.dataPort = dataPort
    }
}

/// Destination: the most this migration may send, all channels together (the host's
/// `--max-bandwidth` shared among its migrations); nil lifts the limit.
public struct LimitMessage: Codable, Equatable, Sendable {
    public var bytesPerSecond: UInt64?
    public init(bytesPerSecond: UInt64?) { self.bytesPerSecond = bytesPerSecond }
}

public struct ReadyMessage: Codable, Equatable, Sendable {
    public var qemuVersion: String
    public init(qemuVersion: String) { self.qemuVersion = qemuVersion }
}

public struct BindMessage: Codable, Equatable, Sendable {
    public var version: UInt16
    public var session: String
    public var channel: UInt32
    public var interface: String
    /// Hex HMAC-SHA256(bindKey, "ferry-bind-v1" | session | channel): proof that the
    /// connection belongs to the session (see ``ChannelBinding``).
    public var proof: String
    public init(version: UInt16, session: String, channel: UInt32, interface: String, proof: String) {
        self.version = version
        self.session = session
        self.channel = channel
        self.interface = interface
        self.proof = proof
    }
}

public struct BoundMessage: Codable, Equatable, Sendable {
    public var channel: UInt32
    /// Hex HMAC-SHA256(bindKey, "ferry-bound-v1" | session | channel): the destination,
    /// too, proves it knows the session.
    public var proof: String
    public init(channel: UInt32, proof: String) {
        self.channel = channel
        self.proof = proof
    }
}

/// Identifies a stream's halves on the wire. A stream's forward half carries bytes from
/// the side that opened it (always the source) to the other; from version 3 on, a two-way
/// stream's reverse half carries bytes back, under the stream's number with bit 31 set.
/// QEMU's migration channels are streams 0, 1, ... in the order QEMU connected; two-way
/// streams of other kinds are numbered from ``firstTwoWay`` up.
public enum StreamID {
    public static let reverseBit: UInt32 = 0x8000_0000
    /// The first number of a stream that is not one of QEMU's migration channels.
    public static let firstTwoWay: UInt32 = 0x1_0000
    /// The most streams of other kinds one session may open (a disk copy takes one per disk).
    public static let twoWayLimit: UInt32 = 4096

    public static func reverse(_ stream: UInt32) -> UInt32 { stream | reverseBit }
    public static func isReverse(_ half: UInt32) -> Bool { half & reverseBit != 0 }
    /// The stream a half belongs to.
    public static func stream(ofHalf half: UInt32) -> UInt32 { half & ~reverseBit }
    /// Whether `stream` is a number a two-way stream may have.
    public static func isTwoWay(_ stream: UInt32) -> Bool {
        stream >= firstTwoWay && stream < firstTwoWay + twoWayLimit
    }
}

/// What a stream carries, and so how the destination connects it.
public enum StreamKind: String, Codable, Sendable, CaseIterable {
    /// One of QEMU's migration channels: one-way, connected to the destination QEMU in order.
    case migration
    /// A disk copy: the source QEMU's NBD client to the destination's NBD server, two-way.
    /// `target` names the disk (its index in the offer's spec), never a path.
    case nbd
    /// Protocol v8: one of a libvirt migration's connections, two-way; `target` is a
    /// ``LibvirtTarget`` (what the destination connects it to, never a path).
    case libvirt
}

/// Where the destination connects a `libvirt` stream: to its libvirtd, or to a socket in
/// the session's migration directory that its QEMU listens on (``LibvirtOfferMessage/directory``).
public enum LibvirtTarget: String, Codable, Sendable, CaseIterable {
    /// libvirt's control connection, source libvirtd to destination libvirtd (peer to peer).
    case libvirtd
    /// One of QEMU's migration channels (the main one first, then the parallel ones), to
    /// the destination QEMU's `migration.sock`, in the order they were opened.
    case migration
    /// A disk copy's NBD connection, to the destination's NBD server at `disks.sock`.
    case disks

    /// The socket's name in the migration directory (nil: the libvirtd socket).
    public var socketName: String? {
        switch self {
        case .libvirtd: return nil
        case .migration: return "migration.sock"
        case .disks: return "disks.sock"
        }
    }
}

/// Protocol v8, source to destination instead of `offer`: a libvirt domain that libvirt
/// migrates peer to peer while Ferry carries libvirt's connections between the hosts. The
/// destination answers `accept` (session, NICs, data port; no files), then `ready` once
/// its libvirtd answers and the migration directory exists; or `error` (`bad-offer`).
public struct LibvirtOfferMessage: Codable, Equatable, Sendable {
    /// The domain's name, for the logs and the destination's account.
    public var domain: String
    /// The migration directory's name: 32 lowercase hex digits, fresh for the session. Both
    /// hosts make `/run/ferry/libvirt/<directory>`, so that the Unix sockets libvirt names
    /// are the same path on both (libvirt requires it).
    public var directory: String
    public var sourceHost: String
    /// The source's `--link-timeout`; the destination waits a little longer.
    public var linkTimeoutSeconds: Double?
    /// Whether libvirt copies the domain's disks (`disks` streams come).
    public var copyStorage: Bool
    /// QEMU's parallel migration channels besides the main one (0: one stream).
    public var parallelConnections: Int
    public init(domain: String, directory: String, sourceHost: String, linkTimeoutSeconds: Double?, copyStorage: Bool,
                parallelConnections: Int) {
        self.domain = domain
        self.directory = directory
        self.sourceHost = sourceHost
        self.linkTimeoutSeconds = linkTimeoutSeconds
        self.copyStorage = copyStorage
        self.parallelConnections = parallelConnections
    }

    /// Whether `name` may name a migration directory (so a peer cannot name a path).
    public static func isDirectoryName(_ name: String) -> Bool {
        name.utf8.count == 32 && name.utf8.allSatisfy { (48...57).contains($0) || (97...102).contains($0) }
    }
}

public struct StreamOpenMessage: Codable, Equatable, Sendable {
    public var stream: UInt32
    /// Absent: `migration` (every stream before version 3).
    public var kind: StreamKind?
    /// What the destination connects the stream to, in the kind's own terms (never a path).
    public var target: String?
    /// 0 (absent) is the bulk of the migration; 1 goes ahead of it on every channel.
    public var priority: UInt8?

    public init(stream: UInt32, kind: StreamKind? = nil, target: String? = nil, priority: UInt8? = nil) {
        self.stream = stream
        self.kind = kind
        self.target = target
        self.priority = priority
    }
}

/// The end of one half of a stream (its number with ``StreamID/reverseBit`` for a reverse
/// half), sent by the side that read it: the peer closes that direction of its socket once
/// it has written every chunk.
public struct StreamEndMessage: Codable, Equatable, Sendable {
    public var stream: UInt32
    public var chunkCount: UInt64
    public var byteCount: UInt64
    public init(stream: UInt32, chunkCount: UInt64, byteCount: UInt64) {
        self.stream = stream
        self.chunkCount = chunkCount
        self.byteCount = byteCount
    }
}

public struct LoadedMessage: Codable, Equatable, Sendable {
    public var receivedByteCount: UInt64
    /// Protocol v6: the destination QEMU holds the device state and waits paused in
    /// postcopy; the rest of the memory comes after the commit, while the VM runs here.
    public var postcopy: Bool?
    public init(receivedByteCount: UInt64, postcopy: Bool = false) {
        self.receivedByteCount = receivedByteCount
        self.postcopy = postcopy ? true : nil
    }
}

/// Protocol v6, destination to source, after a postcopy migration's commit: the
/// destination QEMU has every page, and what the guest waited for them.
public struct PostcopyDoneMessage: Codable, Equatable, Sendable {
    /// QEMU's own account (`postcopy-blocktime`): how long vCPUs waited on missing pages, in
    /// total, milliseconds.
    public var blocktimeMilliseconds: Double?
    /// Page requests Ferry saw cross from the destination QEMU to the source QEMU, and
    /// how long each waited for its page (from the request leaving the destination QEMU
    /// to its page going into it), milliseconds.
    public var requests: UInt64
    public var latencyP50Milliseconds: Double?
    public var latencyP99Milliseconds: Double?
    public var latencyMaxMilliseconds: Double?
    public init(blocktimeMilliseconds: Double?, requests: UInt64, latencyP50Milliseconds: Double?,
                latencyP99Milliseconds: Double?, latencyMaxMilliseconds: Double?) {
        self.blocktimeMilliseconds = blocktimeMilliseconds
        self.requests = requests
        self.latencyP50Milliseconds = latencyP50Milliseconds
        self.latencyP99Milliseconds = latencyP99Milliseconds
        self.latencyMaxMilliseconds = latencyMaxMilliseconds
    }
}

public struct CommitMessage: Codable, Equatable, Sendable {
    public init() {}
}

/// What the destination measured, for the source's report.
public struct CommittedMessage: Codable, Equatable, Sendable {
    public var ferryCPUSeconds: Double
    public var qemuCPUSeconds: Double
    public var receivedByteCount: UInt64
    public var ferryPeakRSSBytes: UInt64
    /// When the destination's steps of the switchover happened (absent from older peers).
    public var times: DestinationSwitchoverTimes?
    /// Where the destination's writers waited (absent from older peers).
    public var waits: DestinationWaits?
    /// The VM runs, but its NICs could not be put on the network there, or not announced:
    /// why (absent when all went well, and from older peers).
    public var networkProblem: String?
    public init(ferryCPUSeconds: Double, qemuCPUSeconds: Double, receivedByteCount: UInt64, ferryPeakRSSBytes: UInt64,
                times: DestinationSwitchoverTimes? = nil, waits: DestinationWaits? = nil, networkProblem: String? = nil) {
        self.waits = waits
        self.networkProblem = networkProblem
        self.ferryCPUSeconds = ferryCPUSeconds
        self.qemuCPUSeconds = qemuCPUSeconds
        self.receivedByteCount = receivedByteCount
        self.ferryPeakRSSBytes = ferryPeakRSSBytes
        self.times = times
    }
}

/// Where the destination's stream writers waited during a migration, in milliseconds: for
/// a chunk that was late while later ones of its stream were already here (the in-order
/// rule holding the others back), and for the destination QEMU to take what was written
/// (a write that blocked 5 ms or more). The longest of each, and the total.
public struct DestinationWaits: Codable, Equatable, Sendable {
    public var lateChunkLongestMilliseconds: Double
    public var lateChunkTotalMilliseconds: Double
    public var qemuLongestMilliseconds: Double
    public var qemuTotalMilliseconds: Double
    public init(lateChunkLongestMilliseconds: Double = 0, lateChunkTotalMilliseconds: Double = 0,
                qemuLongestMilliseconds: Double = 0, qemuTotalMilliseconds: Double = 0) {
        self.lateChunkLongestMilliseconds = lateChunkLongestMilliseconds
        self.lateChunkTotalMilliseconds = lateChunkTotalMilliseconds
        self.qemuLongestMilliseconds = qemuLongestMilliseconds
        self.qemuTotalMilliseconds = qemuTotalMilliseconds
    }
}

/// The destination's moments of the switchover, in seconds since the epoch by its own
/// clock (QEMU's event timestamps where QEMU says): what the source needs to account for
/// the guest's whole pause (docs/ARCHITECTURE.md, "Where the pause goes").
public struct DestinationSwitchoverTimes: Codable, Equatable, Sendable {
    /// Every stream's last byte written into the destination QEMU.
    public var lastByte: Double?
    /// The destination QEMU's MIGRATION event `completed`: it has loaded the VM.
    public var loaded: Double?
    /// The session saw both and began its `prepared` record...
    public var prepareStarted: Double?
    /// ...which was then durable, and `loaded` went out.
    public var prepared: Double?
    /// `commit` arrived.
    public var commitReceived: Double?
    /// The `committed` record was durable; the taps joined their bridges (with NICs) and
    /// `cont` was issued.
    public var committedRecorded: Double?
    /// With NICs: the taps were on their bridges and up, and `cont` was issued.
    public var tapsConnected: Double?
    /// With NICs: QEMU's `announce-self` returned (after the guest resumed).
    public var announced: Double?
    /// The destination QEMU's RESUME event (or `cont`'s return, where the event was missed).
    public var resumed: Double?
    /// `committed` went out.
    public var committedSent: Double?
    public init() {}
}

public struct AbortMessage: Codable, Equatable, Sendable {
    public var reason: String
    public init(reason: String) { self.reason = reason }
}

public struct StatusMessage: Codable, Equatable, Sendable {
    public var text: String
    /// While the destination holds the migration in line (`ferry serve --max-migrations`):
    /// its place (1 is next), 0 once it is admitted; absent otherwise.
    public var queuePosition: Int?
    /// How many migrations wait in that line.
    public var queueLength: Int?
    /// Seconds this migration has waited so far.
    public var queuedSeconds: Double?
    public init(text: String, queuePosition: Int? = nil, queueLength: Int? = nil, queuedSeconds: Double? = nil) {
        self.text = text
        self.queuePosition = queuePosition
        self.queueLength = queueLength
        self.queuedSeconds = queuedSeconds
    }
}

/// JSON coding for control payloads, with errors that name the message.
public enum ControlCoding {
    public static func encode<T: Encodable>(_ value: T) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        // Encoding our own message types cannot fail: they hold only strings and numbers.
        return Array(try! encoder.encode(value))
    }

    public static func decode<T: Decodable>(_ type: T.Type, from frame: Frame) throws(WireError) -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(frame.payload))
        } catch {
            throw .malformedMessage(frame.type, String(describing: error))
        }
    }

    public static func frame<T: Encodable>(_ type: FrameType, _ value: T) -> Frame {
        Frame(type: type, payload: encode(value))
    }
}

/// Protocol v2: the first frame of a connection that takes over a session's control
/// connection. Unsealed; `proof` shows the sender holds the session's bind key and covers
/// every field, so nobody can change the counts on the way (``ControlRejoin``).
public struct RejoinMessage: Codable, Equatable, Sendable {
    public var version: UInt16
    public var session: String
    /// Counts the control connections of the session (the first is 0); each rejoin takes a
    /// number higher than any before, never reused (it also numbers the connection's seal).
    public var generation: UInt32
    /// Control frames the source has received from the destination so far.
    public var received: UInt64
    /// The source's NIC (for the destination's log).
    public var interface: String
    public var proof: String
    public init(version: UInt16, session: String, generation: UInt32, received: UInt64, interface: String, proof: String) {
        self.version = version
        self.session = session
        self.generation = generation
        self.received = received
        self.interface = interface
        self.proof = proof
    }
}

/// Protocol v2: the destination's answer to `rejoin`.
public struct RejoinedMessage: Codable, Equatable, Sendable {
    public var generation: UInt32
    /// Control frames the destination has received from the source so far.
    public var received: UInt64
    public var proof: String
    public init(generation: UInt32, received: UInt64, proof: String) {
        self.generation = generation
        self.received = received
        self.proof = proof
    }
}

/// Protocol v2: control frames received so far (everything but `received` itself counts).
public struct ReceivedMessage: Codable, Equatable, Sendable {
    public var received: UInt64
    public init(received: UInt64) { self.received = received }
}

/// The proofs of `rejoin` and `rejoined`: HMAC-SHA256(bindKey, label ‖ session ‖ generation
/// (u32) ‖ received (u64)), labels "ferry-rejoin-v2" and "ferry-rejoined-v2".
public enum ControlRejoin {
    public enum Role: String, Sendable { case rejoin = "ferry-rejoin-v2", rejoined = "ferry-rejoined-v2" }

    public static func proof(bindKey: [UInt8], session: String, generation: UInt32, received: UInt64, role: Role) -> String {
        var message = Array(role.rawValue.utf8)
        message.append(contentsOf: Array(session.utf8))
        withUnsafeBytes(of: generation.bigEndian) { message.append(contentsOf: $0) }
        withUnsafeBytes(of: received.bigEndian) { message.append(contentsOf: $0) }
        let mac = HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: bindKey))
        return Hex.encode(Array(mac))
    }

    public static func verify(proof: String, bindKey: [UInt8], session: String, generation: UInt32, received: UInt64, role: Role) -> Bool {
        Handshake.equal(self.proof(bindKey: bindKey, session: session, generation: generation, received: received, role: role), proof)
    }

    /// The most connections a session's control may use: their seal numbers count down
    /// from 0xFFFFFFFF, data channel numbers up from 0, and the two never meet.
    public static let maximumGeneration: UInt32 = 0xFFFF

    /// The number a control connection of `generation` seals under (``FrameSeal``).
    public static func sealNumber(generation: UInt32) -> UInt32 { FrameSeal.controlConnection - generation }
}
