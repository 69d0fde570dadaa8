#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A network interface as Ferry sees it: what SMB Multichannel's interface discovery
/// exchanges (name, addresses, link speed, MTU, whether it is usable).
public struct NetworkInterface: Codable, Equatable, Sendable {
    public var name: String
    public var addresses: [InterfaceAddress]
    /// Link speed, from the kernel (/sys/class/net/NAME/speed) or an operator's override;
    /// nil where neither says (veth, many virtual NICs).
    public var speedBitsPerSecond: UInt64?
    public var mtu: Int
    /// Link up with carrier (operstate up, or unknown with carrier 1).
    public var carrier: Bool
    public var isLoopback: Bool

    public init(name: String, addresses: [InterfaceAddress], speedBitsPerSecond: UInt64?, mtu: Int, carrier: Bool, isLoopback: Bool) {
        self.name = name
        self.addresses = addresses
        self.speedBitsPerSecond = speedBitsPerSecond
        self.mtu = mtu
        self.carrier = carrier
        self.isLoopback = isLoopback
    }
}

public struct InterfaceAddress: Codable, Equatable, Sendable {
    public var address: String
    public var prefixLength: Int
    public init(address: String, prefixLength: Int) {
        self.address = address
        self.prefixLength = prefixLength
    }
    public var isIPv6: Bool { address.contains(":") }

    /// The address as bytes (4 or 16), or nil.
    var bytes: [UInt8]? {
        if isIPv6 {
            var a = in6_addr()
            guard inet_pton(AF_INET6, address, &a) == 1 else { return nil }
            return withUnsafeBytes(of: &a) { Array($0) }
        }
        var a = in_addr()
        guard inet_pton(AF_INET, address, &a) == 1 else { return nil }
        return withUnsafeBytes(of: &a) { Array($0) }
    }

    /// True if `other` is in this address's subnet (and of the same family).
    public func sameSubnet(as other: InterfaceAddress) -> Bool {
        guard isIPv6 == other.isIPv6, let a = bytes, let b = other.bytes else { return false }
        let bits = min(prefixLength, other.prefixLength)
        for i in 0..<a.count {
            let remaining = bits - i * 8
            if remaining <= 0 { break }
            let mask: UInt8 = remaining >= 8 ? 0xff : ~(0xff >> UInt8(remaining))
            if a[i] & mask != b[i] & mask { return false }
        }
        return true
    }

    /// Link-local IPv6 (fe80::/10) needs a scope; Ferry does not use it for data channels.
    public var isLinkLocal: Bool { address.lowercased().hasPrefix("fe80:") }
}

public enum InterfaceDiscovery {
    /// This host's interfaces with their addresses, speed, MTU and carrier.
    /// `speeds` overrides or supplies link speeds by interface name.
    public static func list(speeds: [String: UInt64] = [:]) -> [NetworkInterface] {
        var byName: [String: [InterfaceAddress]] = [:]
        var order: [String] = []
        var flagsByName: [String: UInt32] = [:]
        var list: UnsafeMutablePointer<ifaddrs>?
        if getifaddrs(&list) == 0, let first = list {
            var cursor: UnsafeMutablePointer<ifaddrs>? = first
            while let ifa = cursor {
                defer { cursor = ifa.pointee.ifa_next }
                let name = String(cString: ifa.pointee.ifa_name)
                if byName[name] == nil {
                    byName[name] = []
                    order.append(name)
                }
                flagsByName[name] = ifa.pointee.ifa_flags
                guard let sa = ifa.pointee.ifa_addr else { continue }
                let family = Int32(sa.pointee.sa_family)
                guard family == AF_INET || family == AF_INET6 else { continue }
                guard let address = numericHost(sa, family: family) else { continue }
                let prefix = ifa.pointee.ifa_netmask.map { prefixLength($0, family: family) } ?? (family == AF_INET ? 32 : 128)
                byName[name]!.append(InterfaceAddress(address: address, prefixLength: prefix))
            }
            freeifaddrs(first)
        }
        return order.map { name in
            let flags = flagsByName[name] ?? 0
            let sys = "/sys/class/net/\(name)"
            let operstate = read(sys + "/operstate") ?? "unknown"
            let carrierFlag = read(sys + "/carrier") == "1"
            let up = flags & UInt32(IFF_UP) != 0
            let carrier = up && (operstate == "up" || (operstate == "unknown" && carrierFlag))
            let kernelSpeed = reportsRealSpeed(name)
                ? read(sys + "/speed").flatMap { Int64($0) }.flatMap { $0 > 0 ? UInt64($0) * 1_000_000 : nil } : nil
            return NetworkInterface(
                name: name, addresses: byName[name] ?? [],
                speedBitsPerSecond: speeds[name] ?? kernelSpeed,
                mtu: read(sys + "/mtu").flatMap { Int($0) } ?? 1500,
                carrier: carrier,
                isLoopback: flags & UInt32(IFF_LOOPBACK) != 0)
        }
    }

    /// The interface that holds `address`, if any.
    public static func name(holding address: String) -> String? {
        list().first { $0.addresses.contains { $0.address == address } }?.name
    }

    /// Whether the kernel's speed for `name` means anything. A NIC with hardware behind it
    /// (`device`) does, and so do bonds, VLANs and bridges (their DEVTYPE), which derive
    /// theirs from real NICs. veth, dummy and tun have neither and report made-up figures
    /// (veth says 10 Gbit/s whatever the tc rate on it).
    static func reportsRealSpeed(_ name: String) -> Bool {
        let sys = "/sys/class/net/\(name)"
        if FileManager.default.fileExists(atPath: sys + "/device") { return true }
        return (read(sys + "/uevent") ?? "").contains("DEVTYPE=")
    }

    /// Whether `name` has carrier right now (cheap: two small sysfs reads).
    public static func hasCarrier(_ name: String) -> Bool {
        let sys = "/sys/class/net/\(name)"
        guard let operstate = read(sys + "/operstate") else { return false }
        return operstate == "up" || (operstate == "unknown" && read(sys + "/carrier") == "1")
    }

    static func read(_ path: String) -> String? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func numericHost(_ sa: UnsafePointer<sockaddr>, family: Int32) -> String? {
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        let len = socklen_t(family == AF_INET ? MemoryLayout<sockaddr_in>.size : MemoryLayout<sockaddr_in6>.size)
        guard getnameinfo(sa, len, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST) == 0 else { return nil }
        var text = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if let percent = text.firstIndex(of: "%") { text = String(text[..<percent]) }
        return text
    }

    static func prefixLength(_ mask: UnsafePointer<sockaddr>, family: Int32) -> Int {
        if family == AF_INET {
            return mask.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt32(bigEndian: $0.pointee.sin_addr.s_addr).nonzeroBitCount }
        }
        return mask.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { p in
            withUnsafeBytes(of: p.pointee.sin6_addr) { $0.reduce(0) { $0 + $1.nonzeroBitCount } }
        }
    }
}
