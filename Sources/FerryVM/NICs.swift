import CFerryLinux
import Crypto
import FerryIO
import FerryQMP
import FerryWire
import Foundation

/// Guest NICs: a QEMU network device per NIC, its backend a tap on a host bridge.
///
/// Ferry creates each tap itself (TUNSETIFF on /dev/net/tun), hands QEMU the descriptor
/// (`-netdev tap,fd=N`) and closes its own copy, so the tap lives exactly as long as the
/// QEMU that holds it: no tap outlives its VM, and none needs Ferry to remove it. Why a
/// tap and not a macvtap: a macvtap hangs off a physical NIC and cannot reach another
/// VM on the same host through it (without a hairpinning switch), while a tap on the
/// host's bridge works with whatever the operator has already built on that bridge
/// (bonds, VLANs, firewall rules), as libvirt's `<interface type='bridge'>` does.
///
/// Where a NIC's tap is: on a running VM's host, up and on the bridge. On a migration's
/// destination, down and on no bridge until the commit is recorded (``connect(_:)``):
/// QEMU announces the guest's MAC itself as soon as it has loaded the VM, and a rollback
/// after that would leave the network's switches pointing at a host that never ran it.
public enum GuestNICs {
    /// The model a NIC gets when `--nic` names none.
    public static let defaultModel = "virtio-net-pci"

    /// QEMU's id of NIC `index`'s backend and device.
    static func netdevID(_ index: Int) -> String { "net\(index)" }
    static func deviceID(_ index: Int) -> String { "nic\(index)" }

    /// The options for the VM's NICs, the taps at descriptors `fds` in QEMU.
    static func qemuArguments(_ nics: [NICSpec], fds: [Int32]) -> [String] {
        qemuArguments(nics, taps: fds.map { "fd=\($0)" })
    }

    /// The options for the VM's NICs, each tap as `taps[i]` says (`fd=N`, or QEMU alone's
    /// `ifname=TAP,script=no,downscript=no` in the bench): the devices are the same either
    /// way, as the two ends of a migration need.
    ///
    /// vhost=off: the kernel's vhost-net would move the data path out of QEMU, which these
    /// machines lack and a migration then has to hand over too; QEMU's own virtio-net
    /// serves the tap. romfile= (none): no iPXE option ROM, which Ferry's VMs never boot
    /// from, and whose size differs between QEMU packages: a ROM of another size on the
    /// destination fails the migration.
    public static func qemuArguments(_ nics: [NICSpec], taps: [String]) -> [String] {
        var argv: [String] = []
        for (i, nic) in nics.enumerated() where i < taps.count {
            argv += ["-netdev", "tap,id=\(netdevID(i)),\(taps[i]),vhost=off",
                     "-device", "\(nic.model),netdev=\(netdevID(i)),id=\(deviceID(i)),mac=\(nic.mac),romfile="]
        }
        return argv
    }

    /// True if `name` is a bridge on this host (its network namespace).
    public static func bridgeExists(_ name: String) -> Bool {
        NICSpec.validBridgeName(name) && FileManager.default.fileExists(atPath: "/sys/class/net/\(name)/bridge")
    }

    /// The bridge interface `name` is a port of, or nil.
    public static func master(of name: String) -> String? {
        guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/sys/class/net/\(name)/master") else { return nil }
        return (target as NSString).lastPathComponent
    }

    /// True if interface `name` exists here.
    public static func interfaceExists(_ name: String) -> Bool {
        FileManager.default.fileExists(atPath: "/sys/class/net/\(name)")
    }

    /// A MAC for NIC `index` of VM `vm` when the operator gives none: QEMU's prefix
    /// 52:54:00 (locally administered, unicast) and three bytes of SHA-256 of the VM's name
    /// and the index, so the same VM gets the same MAC every time it is created. The next
    /// candidate (a counter in the hash) if that one is `taken`.
    public static func generatedMAC(vm: String, index: Int, taken: Set<String>) -> String {
        var attempt = 0
        while true {
            let digest = Array(SHA256.hash(data: Data("ferry-mac|\(vm)|\(index)|\(attempt)".utf8)))
            let mac = "52:54:00:" + digest.prefix(3).map { String(format: "%02x", $0) }.joined(separator: ":")
            if !taken.contains(mac) { return mac }
            attempt += 1
        }
    }

    private static let modelCache = Locked<[String: String]?>(nil)

    /// QEMU's network device models: each name and alias, to the model's name
    /// (`-device help`, its "Network devices" part).
    public static func knownModels() throws -> [String: String] {
        if let cached = modelCache.current { return cached }
        let result: CommandResult
        do {
            result = try Command.check([QEMU.binary, "-device", "help"])
        } catch {
            throw VMError.qemu("cannot ask QEMU (\(QEMU.binary)) for its network devices: \(error)")
        }
        var models: [String: String] = [:]
        var inNetwork = false
        for line in result.stdout.split(separator: "\n") {
            if !line.hasPrefix("name ") {
                inNetwork = line.hasPrefix("Network devices")
                continue
            }
            guard inNetwork else { continue }
            let quoted = line.split(separator: "\"", omittingEmptySubsequences: false)
            guard quoted.count >= 2 else { continue }
            let name = String(quoted[1])
            models[name] = name
            if let alias = line.range(of: "alias \"") {
                let rest = line[alias.upperBound...]
                models[String(rest.prefix { $0 != "\"" })] = name
            }
        }
        modelCache.withLock { $0 = models }
        return models
    }

    /// The model QEMU knows `name` as (an alias such as `virtio-net` gives its device's
    /// name), or an error that lists the models it knows.
    public static func resolveModel(_ name: String) throws -> String {
        let known = try knownModels()
        if let model = known[name] { return model }
        let names = Set(known.values).sorted().joined(separator: ", ")
        throw VMError.badInput("QEMU (\(QEMU.binary)) has no network device model '\(name)'; it has: \(names)")
    }

    /// What keeps `nics` of VM `vm` from running on this host, or nil: a bridge missing,
    /// a MAC given twice or used by another VM here, a model QEMU does not know, a tap of
    /// that name already here (a VM of another state root with the same MAC).
    public static func problem(_ nics: [NICSpec], vm: String, store: VMStore, host: String = HostInfo.hostname) -> String? {
        var seen = Set<String>()
        let others = macsInUse(store: store, except: vm)
        for (i, nic) in nics.enumerated() {
            guard NICSpec.normalizedMAC(nic.mac) == nic.mac else { return "NIC \(i)'s MAC '\(nic.mac)' is malformed" }
            guard seen.insert(nic.mac).inserted else { return "MAC \(nic.mac) is given to two NICs" }
            if let other = others[nic.mac] { return "MAC \(nic.mac) is already used by VM '\(other)' on \(host)" }
            guard bridgeExists(nic.bridge) else {
                return "bridge '\(nic.bridge)' (NIC \(i)) does not exist on \(host): create it (ip link add \(nic.bridge) type bridge) or give another --nic bridge="
            }
            do {
                let model = try resolveModel(nic.model)
                if model != nic.model { return "NIC \(i)'s model '\(nic.model)' is an alias of '\(model)': name the model" }
            } catch {
                return "\(error)"
            }
            if interfaceExists(nic.tapName) { return "an interface named \(nic.tapName) (NIC \(i)'s tap) already exists on \(host)" }
        }
        return nil
    }

    /// The MACs of this host's VMs (healthy ones; a damaged VM's spec may be unreadable),
    /// each with its VM's name, leaving out `except`.
    public static func macsInUse(store: VMStore, except: String? = nil) -> [String: String] {
        var macs: [String: String] = [:]
        for record in store.list() where record.spec.name != except {
            for nic in record.spec.nics { macs[nic.mac] = record.spec.name }
        }
        return macs
    }

    /// Puts the VM's taps on their bridges and brings them up (each one not already so):
    /// the VM is on its network from here on. Idempotent.
    public static func connect(_ nics: [NICSpec]) throws {
        for nic in nics {
            let current = master(of: nic.tapName)
            if current != nic.bridge {
                if let current { try check(ferry_bridge_attach(current, nic.tapName, 0), "take \(nic.tapName) off bridge \(current)") }
                try check(ferry_bridge_attach(nic.bridge, nic.tapName, 1), "put tap \(nic.tapName) on bridge \(nic.bridge)")
            }
            try check(ferry_link_set_up(nic.tapName, 1), "bring tap \(nic.tapName) up")
        }
    }

    /// Tells the network where the VM is: QEMU's `announce-self` sends RARP frames for each
    /// NIC's MAC (the switches learn its port) and asks a guest that can (virtio-net's
    /// GUEST_ANNOUNCE) to send its own gratuitous ARPs; 3 rounds, 50 ms then 100 ms apart.
    public static func announce(_ qmp: QMPClient) throws(QMPError) {
        try qmp.execute("announce-self", arguments: ["initial": .number(50), "max": .number(150),
                                                       "rounds": .number(3), "step": .number(50)])
    }

    private static func check(_ rc: Int32, _ what: String) throws {
        guard rc == 0 else { throw VMError.io("cannot \(what): \(String(cString: strerror(-rc)))") }
    }
}

/// The taps of one QEMU about to start: Ferry's descriptors, given to QEMU, then closed here
/// (by ``close()``, or when the set goes, as it does with what it holds when making it fails).
public final class TapSet {
    /// One per NIC, in order.
    public private(set) var fds: [Int32] = []

    private init() {}

    /// Creates a tap for each NIC (down, on no bridge).
    public static func create(_ nics: [NICSpec]) throws -> TapSet {
        let set = TapSet()
        for nic in nics {
            let fd = ferry_tap_open(nic.tapName)
            guard fd >= 0 else {
                let why = fd == -EBUSY ? "another process holds it" : String(cString: strerror(-fd))
                throw VMError.io("cannot create tap \(nic.tapName) for MAC \(nic.mac): \(why)")
            }
            set.fds.append(fd)
        }
        return set
    }

    /// The taps QEMU `pid` holds for `nics` (a same-host update's successor shares them:
    /// a single-queue tap is one open file, which two QEMUs can hold but not both open).
    /// Found by name in QEMU's descriptors (their `iff:` in /proc/PID/fdinfo).
    public static func borrow(_ nics: [NICSpec], from pid: Int32) throws -> TapSet {
        var byName: [String: Int32] = [:]
        let fdDirectory = "/proc/\(pid)/fdinfo"
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: fdDirectory)) ?? [] {
            guard let fd = Int32(entry), let info = try? String(contentsOfFile: fdDirectory + "/" + entry, encoding: .utf8),
                  let line = info.split(separator: "\n").first(where: { $0.hasPrefix("iff:") }) else { continue }
            byName[line.dropFirst(4).trimmingCharacters(in: .whitespaces)] = fd
        }
        let set = TapSet()
        for nic in nics {
            guard let theirs = byName[nic.tapName] else {
                throw VMError.qemu("QEMU pid \(pid) holds no tap \(nic.tapName) (MAC \(nic.mac))")
            }
            let fd = ferry_pidfd_getfd(pid, theirs)
            guard fd >= 0 else {
                throw VMError.io("cannot take tap \(nic.tapName) from QEMU pid \(pid): \(String(cString: strerror(-fd)))")
            }
            set.fds.append(fd)
        }
        return set
    }

    /// Closes Ferry's copies (QEMU keeps its own).
    public func close() {
        for fd in fds { Foundation.close(fd) }
        fds = []
    }

    deinit { close() }
}
