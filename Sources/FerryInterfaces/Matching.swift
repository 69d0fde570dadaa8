/// Which NICs an operator lets Ferry use: `--nics eth0,eth1` (only these) or
/// `--nics=-eth2` (all but these; the `=` keeps the leading dash from reading as an option).
public struct NICSelection: Sendable, Equatable {
    public var include: Set<String>?
    public var exclude: Set<String>

    public init(include: Set<String>? = nil, exclude: Set<String> = []) {
        self.include = include
        self.exclude = exclude
    }

    public static let all = NICSelection()

    /// Parses "eth0,eth1", "-eth2,-eth3" or a mix ("eth0,eth1,-eth1" excludes eth1).
    public init?(argument: String) {
        var include = Set<String>()
        var exclude = Set<String>()
        for raw in argument.split(separator: ",") {
            let item = raw.trimmingCharacters(in: .whitespaces)
            if item.hasPrefix("-") {
                guard item.count > 1 else { return nil }
                exclude.insert(String(item.dropFirst()))
            } else {
                guard !item.isEmpty else { return nil }
                include.insert(item)
            }
        }
        guard !include.isEmpty || !exclude.isEmpty else { return nil }
        self.include = include.isEmpty ? nil : include
        self.exclude = exclude
    }

    public func allows(_ name: String) -> Bool {
        if exclude.contains(name) { return false }
        if let include { return include.contains(name) }
        return true
    }
}

/// One usable path between the two hosts: a local NIC and a remote NIC on the same subnet.
public struct NICPair: Codable, Equatable, Sendable {
    public var localInterface: String
    public var localAddress: String
    public var remoteInterface: String
    public var remoteAddress: String
    /// The slower of the two ends, where known.
    public var speedBitsPerSecond: UInt64?

    public init(localInterface: String, localAddress: String, remoteInterface: String, remoteAddress: String, speedBitsPerSecond: UInt64?) {
        self.localInterface = localInterface
        self.localAddress = localAddress
        self.remoteInterface = remoteInterface
        self.remoteAddress = remoteAddress
        self.speedBitsPerSecond = speedBitsPerSecond
    }
}

/// Matches this host's NICs with the peer's, as SMB Multichannel does: a pair per remote
/// NIC that shares a subnet with a usable local NIC, then only the fastest speed class.
public enum NICMatcher {
    /// A NIC slower than this share of the fastest pair is left out. SMB uses only the
    /// fastest class; Ferry's pull-based striping lets a slower NIC add its bandwidth
    /// without holding the others back, so only much slower NICs are dropped: a 1 Gbit/s
    /// NIC next to 10 Gbit/s ones adds 5% and would hold chunks ten times longer than the
    /// others, a 500 Mbit/s one next to 1 Gbit/s adds 50%.
    public static let speedClassRatio = 0.25

    public struct Result: Sendable {
        public var pairs: [NICPair]
        /// Interfaces left out, with why (for the report).
        public var skipped: [String]
    }

    public static func match(local: [NetworkInterface], remote: [NetworkInterface],
                             localSelection: NICSelection = .all) -> Result {
        var pairs: [NICPair] = []
        var skipped: [String] = []
        var usedLocal = Set<String>()
        for r in remote where !r.isLoopback {
            guard r.carrier else { skipped.append("\(r.name) (peer): no carrier"); continue }
            var found = false
            for raddr in r.addresses where !raddr.isLinkLocal {
                for l in local where !l.isLoopback && !usedLocal.contains(l.name) {
                    guard let laddr = l.addresses.first(where: { !$0.isLinkLocal && $0.sameSubnet(as: raddr) }) else { continue }
                    guard localSelection.allows(l.name) else { skipped.append("\(l.name): excluded by --nics"); usedLocal.insert(l.name); continue }
                    guard l.carrier else { skipped.append("\(l.name): no carrier"); usedLocal.insert(l.name); continue }
                    let speeds = [l.speedBitsPerSecond, r.speedBitsPerSecond].compactMap { $0 }
                    pairs.append(NICPair(localInterface: l.name, localAddress: laddr.address, remoteInterface: r.name,
                                         remoteAddress: raddr.address, speedBitsPerSecond: speeds.min()))
                    usedLocal.insert(l.name)
                    found = true
                    break
                }
                if found { break }
            }
            if !found && !skipped.contains(where: { $0.hasPrefix(r.name + " ") }) {
                skipped.append("\(r.name) (peer): no local NIC on its subnet")
            }
        }
        // Speed classes: keep pairs at least speedClassRatio of the fastest known speed.
        // Pairs of unknown speed are kept (the kernel reports none for veth and many
        // virtual NICs; `--nic-speed` supplies one).
        if let fastest = pairs.compactMap(\.speedBitsPerSecond).max() {
            let floor = Double(fastest) * speedClassRatio
            for pair in pairs where (pair.speedBitsPerSecond.map { Double($0) < floor }) ?? false {
                skipped.append("\(pair.localInterface): \(pair.speedBitsPerSecond! / 1_000_000) Mbit/s is below the fastest class")
            }
            pairs.removeAll { ($0.speedBitsPerSecond.map { Double($0) < floor }) ?? false }
        }
        return Result(pairs: pairs, skipped: skipped)
    }
}

/// Parses link speeds: "eth0=10gbit,eth1=1gbit" (tc-style units: bit, kbit, mbit, gbit).
public enum SpeedList {
    public static func parse(_ text: String) -> [String: UInt64]? {
        var out: [String: UInt64] = [:]
        for item in text.split(separator: ",") {
            let parts = item.split(separator: "=")
            guard parts.count == 2, let bps = parseRate(String(parts[1])) else { return nil }
            out[String(parts[0]).trimmingCharacters(in: .whitespaces)] = bps
        }
        return out.isEmpty ? nil : out
    }

    /// A rate as tc writes it ("1gbit", "500mbit", "100kbit", "9600bit"), in bits per second.
    /// The lab, the bench and `--nic-speed` all read rates through this.
    public static func parseRate(_ text: String) -> UInt64? {
        let lower = text.lowercased().trimmingCharacters(in: .whitespaces)
        for (unit, factor) in [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)] where lower.hasSuffix(unit) {
            guard let v = Double(lower.dropLast(unit.count)), v > 0 else { return nil }
            return UInt64(v * factor)
        }
        return nil
    }
}
