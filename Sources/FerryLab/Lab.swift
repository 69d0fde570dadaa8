import FerryIO
import FerryInterfaces
import FerryVM
import FerryWire
import Foundation

/// The test lab: hosts `a`, `b` (and `c`, ... with `--hosts`), each a network namespace
/// with its own Ferry state, joined by N NICs, each NIC on its own /24, optionally rate
/// limited with tc tbf (a NIC's speed, in both directions). Two hosts are joined by veth
/// pairs, a cable per NIC; three or more through a switch per NIC (a bridge in the switch
/// namespace), each host's NIC a port, the port rate limited towards the host too, so a
/// host that two others send to receives at its NIC's rate, as behind a real switch.
///
/// Apart from those NICs, the VMs' own network: each host has a bridge (``vmBridge``) with
/// an uplink to a switch (a bridge in namespace NAME-sw), and a client namespace
/// (NAME-client) hangs off that switch, as a VM's users would. All of it on 10.78.0.0/24
/// (``vmNetworkAddress(_:)``, ``guestAddress(_:)``).
public struct Lab: Sendable {
    /// The names lab hosts take, in order (`--hosts N` uses the first N).
    public static let hostNames = ["a", "b", "c", "d", "e", "f", "g", "h"]
    /// The hosts of a lab that is up (a and b when it is not).
    public var hosts: [String] { Array(Self.hostNames.prefix(config?.hostCount ?? 2)) }
    /// The namespaces besides the hosts: the VM network's switch and its client.
    public static let switchNamespace = "sw", client = "client"
    /// The bridge of each host that VMs' NICs join (`--nic bridge=ferrybr0`).
    public static let vmBridge = "ferrybr0"
    /// The VM network's prefix length.
    public static let vmNetworkPrefix = 24

    public struct Config: Codable, Sendable, Equatable {
        public var name: String
        public var nics: Int
        /// tc rate of every NIC (e.g. "1gbit"), or one per NIC ("1gbit,500mbit"); nil for unlimited.
        public var rate: String?

        /// The rate of NIC `nic`, if limited.
        public func rate(nic: Int) -> String? {
            guard let rate else { return nil }
            let list = rate.split(separator: ",").map(String.init)
            return list.count == 1 ? list[0] : (nic < list.count ? list[nic] : nil)
        }
        public var createdAt: Date
        /// Hosts in the lab (nil in labs made before `--hosts`: 2).
        public var hosts: Int?
        public var hostCount: Int { hosts ?? 2 }
        /// `--libvirt`: a libvirtd on each host, each host in a mount namespace of its own (nil: none).
        public var libvirt: Bool?
    }

    public enum LabError: Error, CustomStringConvertible {
        case badInput(String)
        case notUp(String)
        case setup(String)
        public var description: String {
            switch self {
            case .badInput(let s), .setup(let s): return s
            case .notUp(let name): return "lab '\(name)' is not up (run `ferry lab up`)"
            }
        }
    }

    public let name: String
    public init(name: String = "ferry") { self.name = name }

    public var directory: String { "/run/ferry-lab/\(name)" }
    var configPath: String { directory + "/lab.json" }
    /// The hosts' configuration file (`FERRY_CONFIG` in `exec`).
    public var configFile: String { directory + "/ferry.conf" }
    /// The lab's cluster key, shared by both hosts (`FERRY_KEY_FILE` in `exec`).
    public var keyPath: String { directory + "/cluster.key" }

    public func namespace(_ host: String) -> String { "\(name)-\(host)" }
    public func stateDirectory(_ host: String) -> String { directory + "/" + host }
    /// The address of `host` on NIC `nic` (0-based): 10.77.<nic+1>.1 on a, .2 on b, .3 on c...
    public func address(_ host: String, nic: Int) -> String { "10.77.\(nic + 1).\(Self.number(host))" }

    /// 1 for a, 2 for b, ...
    static func number(_ host: String) -> Int { (hostNames.firstIndex(of: host) ?? 0) + 1 }
    public func interface(nic: Int) -> String { "eth\(nic)" }

    /// An address on the VM network: host a's bridge 10.78.0.1, b's .2 (c's .3...), the client .100.
    public func vmNetworkAddress(_ host: String) -> String {
        "10.78.0." + (host == Self.client ? "100" : "\(Self.number(host))")
    }

    /// The address the lab's guest number `n` (0-89) takes on the VM network: 10.78.0.(10+n).
    public func guestAddress(_ n: Int) -> String { "10.78.0.\(10 + max(0, min(n, 89)))" }

    public var config: Config? {
        guard let data = FileManager.default.contents(atPath: configPath) else { return nil }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try? decoder.decode(Config.self, from: data)
    }

    public var isUp: Bool {
        config != nil && (try? Command.run(["ip", "netns", "list"]).stdout.contains(namespace("a"))) == true
    }

    public static func validateName(_ name: String) throws {
        guard !name.isEmpty, name.count <= 10, name.allSatisfy({ $0.isLetter || $0.isNumber }), name.first!.isLetter else {
            throw LabError.badInput("lab name '\(name)' must be 1-10 letters and digits, starting with a letter")
        }
    }

    /// One rate for every NIC, or a comma-separated rate per NIC.
    public static func validateRates(_ rates: String, nics: Int) throws {
        let list = rates.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard list.count == 1 || list.count == nics else {
            throw LabError.badInput("--rate has \(list.count) rates for \(nics) NICs: give one, or one per NIC")
        }
        for rate in list { try validateRate(rate) }
    }

    public static func validateRate(_ rate: String) throws {
        guard SpeedList.parseRate(rate) != nil else {
            throw LabError.badInput("rate '\(rate)' is not like 1gbit, 500mbit or 100kbit")
        }
    }

    /// Creates the namespaces, the NICs and their rates. Fails if the lab is already up.
    public func up(nics: Int, rate: String?, hosts hostCount: Int = 2, libvirt: Bool = false) throws {
        try Self.validateName(name)
        guard (1...8).contains(nics) else { throw LabError.badInput("--nics must be between 1 and 8, not \(nics)") }
        guard (2...Self.hostNames.count).contains(hostCount) else {
            throw LabError.badInput("--hosts must be between 2 and \(Self.hostNames.count), not \(hostCount)")
        }
        let hosts = Array(Self.hostNames.prefix(hostCount))
        if let rate { try Self.validateRates(rate, nics: nics) }
        guard getuid() == 0 else { throw LabError.setup("the lab needs root (network namespaces)") }
        guard Command.exists("ip") && Command.exists("tc") else {
            throw LabError.setup("the lab needs iproute2 (ip, tc): apt-get install iproute2")
        }
        if isUp { throw LabError.setup("lab '\(name)' is already up; `ferry lab down\(name == "ferry" ? "" : " --name \(name)")` first") }
        // A half-made lab from a crash: clear it first.
        try? down()
        do {
            for host in hosts {
                try Command.check(["ip", "netns", "add", namespace(host)])
                try Command.check(["ip", "-n", namespace(host), "link", "set", "lo", "up"])
                try FileManager.default.createDirectory(atPath: stateDirectory(host), withIntermediateDirectories: true)
            }
            let plan = Config(name: name, nics: nics, rate: rate, createdAt: Date(), hosts: hostCount, libvirt: libvirt ? true : nil)
            let sw = namespace(Self.switchNamespace)
            try Command.check(["ip", "netns", "add", sw])
            try Command.check(["ip", "-n", sw, "link", "set", "lo", "up"])
            for nic in 0..<nics where hostCount > 2 {
                // A switch per NIC: every host's NIC is a port of bridge m<nic>.
                try Command.check(["ip", "-n", sw, "link", "add", "m\(nic)", "type", "bridge"])
                try Command.check(["ip", "-n", sw, "link", "set", "m\(nic)", "up"])
                for host in hosts {
                    try plug(from: (namespace(host), "\(name)\(host)\(nic)", interface(nic: nic), nil),
                             to: (sw, "\(name)p\(host)\(nic)", switchPort(host, nic: nic), "m\(nic)"))
                    try Command.check(["ip", "-n", namespace(host), "addr", "add", "\(address(host, nic: nic))/24", "dev", interface(nic: nic)])
                    if let rate = plan.rate(nic: nic) {
                        try shape(namespace(host), device: interface(nic: nic), rate: rate)
                        try shape(sw, device: switchPort(host, nic: nic), rate: rate)
                    }
                }
            }
            for nic in 0..<nics where hostCount == 2 {
                let ta = "\(name)a\(nic)", tb = "\(name)b\(nic)"
                try Command.check(["ip", "link", "add", ta, "type", "veth", "peer", "name", tb])
                for (host, tmp) in [("a", ta), ("b", tb)] {
                    let ns = namespace(host)
                    try Command.check(["ip", "link", "set", tmp, "netns", ns])
                    try Command.check(["ip", "-n", ns, "link", "set", tmp, "name", interface(nic: nic)])
                    try Command.check(["ip", "-n", ns, "addr", "add", "\(address(host, nic: nic))/24", "dev", interface(nic: nic)])
                    try Command.check(["ip", "-n", ns, "link", "set", interface(nic: nic), "up"])
                    if let rate = plan.rate(nic: nic) { try shape(ns, device: interface(nic: nic), rate: rate) }
                }
            }
            try buildVMNetwork(hosts: hosts)
            // One cluster key for both hosts, as an operator copies it to every host.
            let key = KeyRing(keys: [ClusterKey.generate()]).fileText
            guard FileManager.default.createFile(atPath: keyPath, contents: Data(key.utf8), attributes: [.posixPermissions: 0o600]) else {
                throw LabError.setup("cannot write the lab's cluster key \(keyPath)")
            }
            // The lab's hosts read this (empty) configuration file, not the machine's
            // /etc/ferry/ferry.conf, which they would otherwise all share.
            guard FileManager.default.createFile(atPath: configFile, contents: Data("# ferry lab \(name): no host settings; ferry lab exec sets what the hosts need\n".utf8)) else {
                throw LabError.setup("cannot write the lab's configuration file \(configFile)")
            }
            if libvirt { try LabLibvirt(lab: self).up(hosts: hosts) }
            let config = plan
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            encoder.dateEncodingStrategy = .iso8601
            try encoder.encode(config).write(to: URL(fileURLWithPath: configPath))
        } catch {
            try? down()
            throw LabError.setup("lab setup failed: \(error)")
        }
    }

    /// The VM network: a switch namespace with bridge sw0; on each host the bridge VMs'
    /// taps join, with the host's address and an uplink to the switch; the client, on the
    /// switch too. The bridges' MACs are fixed, so that a tap joining one never changes it
    /// (a bridge takes its lowest port's MAC otherwise, and the host's neighbours' ARP
    /// caches would go stale).
    private func buildVMNetwork(hosts: [String]) throws {
        let sw = namespace(Self.switchNamespace), client = namespace(Self.client)
        try Command.check(["ip", "netns", "add", client])
        try Command.check(["ip", "-n", client, "link", "set", "lo", "up"])
        try Command.check(["ip", "-n", sw, "link", "add", "sw0", "type", "bridge"])
        try Command.check(["ip", "-n", sw, "link", "set", "sw0", "up"])
        for (i, host) in hosts.enumerated() {
            let ns = namespace(host)
            try Command.check(["ip", "-n", ns, "link", "add", Self.vmBridge, "address", "02:fe:00:00:00:0\(i + 1)", "type", "bridge"])
            try Command.check(["ip", "-n", ns, "addr", "add", "\(vmNetworkAddress(host))/\(Self.vmNetworkPrefix)", "dev", Self.vmBridge])
            try Command.check(["ip", "-n", ns, "link", "set", Self.vmBridge, "up"])
            try plug(from: (ns, "\(name)u\(host)", "uplink", Self.vmBridge), to: (sw, "\(name)s\(host)", "host-\(host)", "sw0"))
        }
        try plug(from: (client, "\(name)cl", "eth0", nil), to: (sw, "\(name)sc", "client", "sw0"))
        try Command.check(["ip", "-n", client, "addr", "add", "\(vmNetworkAddress(Self.client))/\(Self.vmNetworkPrefix)", "dev", "eth0"])
    }

    /// A veth pair between two namespaces: each end made under a temporary name in this
    /// one, moved, renamed, put on its bridge (if any) and brought up.
    private func plug(from a: (ns: String, temporary: String, name: String, bridge: String?),
                      to b: (ns: String, temporary: String, name: String, bridge: String?)) throws {
        try Command.check(["ip", "link", "add", a.temporary, "type", "veth", "peer", "name", b.temporary])
        for end in [a, b] {
            try Command.check(["ip", "link", "set", end.temporary, "netns", end.ns])
            try Command.check(["ip", "-n", end.ns, "link", "set", end.temporary, "name", end.name])
            if let bridge = end.bridge { try Command.check(["ip", "-n", end.ns, "link", "set", end.name, "master", bridge]) }
            try Command.check(["ip", "-n", end.ns, "link", "set", end.name, "up"])
        }
    }

    /// tbf's bucket: 4 ms of the rate, at least 64 KiB (one GSO super-packet must fit).
    static func burst(for rate: String) -> String {
        let bitsPerSecond = Double(SpeedList.parseRate(rate) ?? 1_000_000_000)
        let bytes = max(64 * 1024, Int(bitsPerSecond / 8 * 0.004))
        return "\(bytes)b"
    }

    /// Stops every process in the lab (VMs, daemons), deletes the namespaces and the state.
    public func down() throws {
        // libvirt's daemons and domains first: their QEMUs are not in Ferry's stores.
        LabLibvirt(lab: self).down()
        for host in Self.hostNames where host == "a" || host == "b" || Self.namespaceExists(namespace(host)) {
            let store = VMStore(paths: StatePaths(root: stateDirectory(host)))
            // Found by their command lines: a VM whose files are damaged has a QEMU too.
            for entry in store.entries() {
                let pids: [Int32]
                switch entry {
                case .healthy(let record): pids = record.alive ? [record.state.pid] : []
                case .damaged(let vm): pids = vm.qemus.map(\.pid)
                }
                for pid in pids { ProcessStats.terminate(pid: pid, grace: .seconds(2)) }
            }
            removeNamespace(namespace(host))
            // The host's guest RAM files live on /dev/shm, outside the lab's directory;
            // its QEMUs are gone now.
            try? FileManager.default.removeItem(atPath: store.paths.memoryDirectory)
        }
        for other in [Self.switchNamespace, Self.client] { removeNamespace(namespace(other)) }
        let vmNetworkLinks = Set(Self.hostNames.flatMap { host in ["\(name)u\(host)", "\(name)s\(host)"]
            + (0..<8).flatMap { nic in ["\(name)\(host)\(nic)", "\(name)p\(host)\(nic)"] } } + ["\(name)cl", "\(name)sc"])
        // veth peers die with their namespaces; a half-made lab may have left some in the root.
        if let links = try? Command.run(["ip", "-o", "link", "show"]).stdout {
            for line in links.split(separator: "\n") {
                let parts = line.split(separator: ":")
                guard parts.count > 1 else { continue }
                let ifname = parts[1].trimmingCharacters(in: .whitespaces).split(separator: "@").first.map(String.init) ?? ""
                if vmNetworkLinks.contains(ifname)
                    || (ifname.hasPrefix(name + "a") || ifname.hasPrefix(name + "b")) && ifname.dropFirst(name.count + 1).allSatisfy(\.isNumber) {
                    _ = try? Command.run(["ip", "link", "del", ifname])
                }
            }
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Host `host`'s port on the switch of NIC `nic` (labs of three hosts or more).
    func switchPort(_ host: String, nic: Int) -> String { "p\(host)\(nic)" }

    static func namespaceExists(_ ns: String) -> Bool {
        FileManager.default.fileExists(atPath: "/run/netns/" + ns)
    }

    /// Stops every process left in namespace `ns` and deletes it.
    private func removeNamespace(_ ns: String) {
        if let pids = try? Command.run(["ip", "netns", "pids", ns]).stdout {
            for pid in pids.split(separator: "\n").compactMap({ Int32($0.trimmingCharacters(in: .whitespaces)) }) {
                ProcessStats.terminate(pid: pid, grace: .seconds(2))
            }
        }
        _ = try? Command.run(["ip", "netns", "del", ns])
    }

    /// The argv that runs `command` inside `host`, with that host's Ferry state.
    /// `client`: the VM network's client, which has no Ferry state.
    public func execArguments(_ host: String, _ command: [String]) throws -> [String] {
        if host == Self.client {
            guard isUp else { throw LabError.notUp(name) }
            return ["ip", "netns", "exec", namespace(host), "env", "FERRY_LAB=\(name)"] + command
        }
        guard isUp else { throw LabError.notUp(name) }
        guard hosts.contains(host) else { throw LabError.badInput("lab host must be \(hosts.joined(separator: ", ")) or client, not '\(host)'") }
        // The VM network's bridge carries the host's address there, but no migration:
        // the lab's migration NICs are eth0, eth1, ... (as an operator keeps a migration
        // network apart with --nics).
        var env = ["FERRY_STATE_DIR=\(stateDirectory(host))", "FERRY_HOST_NAME=\(host)", "FERRY_LAB=\(name)",
                   "FERRY_KEY_FILE=\(keyPath)", "FERRY_NICS=-\(Self.vmBridge)", "FERRY_CONFIG=\(configFile)"]
        // veth reports no link speed: tell Ferry the rate each lab NIC is limited to.
        if let config, config.rate != nil {
            let speeds = (0..<config.nics).compactMap { nic in config.rate(nic: nic).map { "\(interface(nic: nic))=\($0)" } }
            env.append("FERRY_NIC_SPEEDS=" + speeds.joined(separator: ","))
        }
        // With libvirt, each host has its own mount namespace (libvirt's paths).
        let enter = config?.libvirt == true ? LabLibvirt(lab: self).enter(host) : []
        return enter + ["ip", "netns", "exec", namespace(host), "env"] + env + command
    }

    /// Limits NIC `nic` to `rate` (tc's form, e.g. "8mbit") on both hosts from now on, as a
    /// link that slows down mid-migration would.
    public func setRate(nic: Int, rate: String) throws {
        guard let config else { throw LabError.notUp(name) }
        guard (0..<config.nics).contains(nic) else {
            throw LabError.badInput("NIC \(nic) does not exist; the lab has NICs 0-\(config.nics - 1)")
        }
        for host in hosts {
            try shape(namespace(host), device: interface(nic: nic), rate: rate)
            if config.hostCount > 2 { try shape(namespace(Self.switchNamespace), device: switchPort(host, nic: nic), rate: rate) }
        }
    }

    /// NIC `nic` in namespace `ns` sends at most `rate` (tc tbf, its bucket from ``burst(for:)``,
    /// its queue from ``queueLimit(for:)``).
    private func shape(_ ns: String, device: String, rate: String) throws {
        try Command.check(["tc", "-n", ns, "qdisc", "replace", "dev", device, "root", "tbf",
                           "rate", rate, "burst", Self.burst(for: rate), "limit", Self.queueLimit(for: rate)])
    }

    /// tbf's queue: 20 ms of the rate, at least 256 KiB. A switch port buffers bytes, not
    /// time: at 6 Mbit/s 20 ms is ten packets, and a link that slowed to that rate dropped
    /// so much that TCP backed off for more than a second, which Ferry rightly takes for a
    /// dead path (seen once in `DiskTests.fastWriter`, 1 gbit slowed to 6 mbit mid-copy).
    static func queueLimit(for rate: String) -> String {
        let bitsPerSecond = Double(SpeedList.parseRate(rate) ?? 1_000_000_000)
        return "\(max(256 * 1024, Int(bitsPerSecond / 8 * 0.020)))b"
    }

    /// Takes NIC `nic` of `host` down or up.
    public func setNIC(_ host: String, nic: Int, up: Bool) throws {
        guard let config else { throw LabError.notUp(name) }
        guard hosts.contains(host) else { throw LabError.badInput("lab host must be \(hosts.joined(separator: ", ")), not '\(host)'") }
        guard (0..<config.nics).contains(nic) else {
            throw LabError.badInput("NIC \(nic) does not exist; the lab has NICs 0-\(config.nics - 1)")
        }
        try Command.check(["ip", "-n", namespace(host), "link", "set", interface(nic: nic), up ? "up" : "down"])
    }
}
