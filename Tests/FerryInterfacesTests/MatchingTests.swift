import Testing
@testable import FerryInterfaces

@Suite("NIC discovery and pairing")
struct MatchingTests {
    func nic(_ name: String, _ addr: String, _ prefix: Int = 24, speed: UInt64? = nil, carrier: Bool = true) -> NetworkInterface {
        NetworkInterface(name: name, addresses: [InterfaceAddress(address: addr, prefixLength: prefix)],
                         speedBitsPerSecond: speed, mtu: 1500, carrier: carrier, isLoopback: false)
    }

    @Test("subnets, IPv4 and IPv6")
    func subnets() {
        let a = InterfaceAddress(address: "10.77.1.1", prefixLength: 24)
        #expect(a.sameSubnet(as: InterfaceAddress(address: "10.77.1.200", prefixLength: 24)))
        #expect(!a.sameSubnet(as: InterfaceAddress(address: "10.77.2.1", prefixLength: 24)))
        #expect(InterfaceAddress(address: "10.77.0.1", prefixLength: 16).sameSubnet(as: InterfaceAddress(address: "10.77.9.1", prefixLength: 16)))
        #expect(InterfaceAddress(address: "192.168.1.1", prefixLength: 30).sameSubnet(as: InterfaceAddress(address: "192.168.1.2", prefixLength: 30)))
        #expect(!InterfaceAddress(address: "192.168.1.1", prefixLength: 30).sameSubnet(as: InterfaceAddress(address: "192.168.1.5", prefixLength: 30)))
        let v6 = InterfaceAddress(address: "fd00:1::1", prefixLength: 64)
        #expect(v6.sameSubnet(as: InterfaceAddress(address: "fd00:1::2", prefixLength: 64)))
        #expect(!v6.sameSubnet(as: InterfaceAddress(address: "fd00:2::2", prefixLength: 64)))
        #expect(!v6.sameSubnet(as: a))
    }

    @Test("one pair per NIC on a shared subnet; down and excluded NICs are left out, with a reason")
    func pairing() {
        let local = [nic("eth0", "10.0.1.1"), nic("eth1", "10.0.2.1"), nic("eth2", "10.0.3.1", carrier: false), nic("eth3", "10.0.4.1")]
        let remote = [nic("p0", "10.0.1.2"), nic("p1", "10.0.2.2"), nic("p2", "10.0.3.2"), nic("p3", "10.0.4.2"), nic("p9", "172.16.0.2")]
        let r = NICMatcher.match(local: local, remote: remote, localSelection: NICSelection(argument: "-eth3")!)
        #expect(r.pairs.map(\.localInterface) == ["eth0", "eth1"])
        #expect(r.pairs.map(\.remoteAddress) == ["10.0.1.2", "10.0.2.2"])
        #expect(r.skipped.contains { $0.hasPrefix("eth2") && $0.contains("carrier") })
        #expect(r.skipped.contains { $0.hasPrefix("eth3") && $0.contains("--nics") })
        #expect(r.skipped.contains { $0.hasPrefix("p9") })
    }

    @Test("only the fastest speed class is used; unequal but close NICs are both used")
    func speedClasses() {
        let local = [nic("a", "10.0.1.1", speed: 10_000_000_000), nic("b", "10.0.2.1", speed: 10_000_000_000), nic("c", "10.0.3.1", speed: 1_000_000_000)]
        let remote = [nic("x", "10.0.1.2"), nic("y", "10.0.2.2"), nic("z", "10.0.3.2")]
        #expect(NICMatcher.match(local: local, remote: remote).pairs.map(\.localInterface) == ["a", "b"])
        let close = [nic("a", "10.0.1.1", speed: 1_000_000_000), nic("b", "10.0.2.1", speed: 500_000_000)]
        #expect(NICMatcher.match(local: close, remote: remote).pairs.count == 2)
        // The slower end of a pair sets its speed.
        let slowRemote = [nic("x", "10.0.1.2", speed: 1_000_000_000)]
        let pair = NICMatcher.match(local: local, remote: slowRemote).pairs
        #expect(pair.map(\.localInterface) == ["a"])
        #expect(pair.first?.speedBitsPerSecond == 1_000_000_000)
    }

    @Test("selections and speed lists parse")
    func parsing() {
        #expect(NICSelection(argument: "eth0,eth1")?.allows("eth1") == true)
        #expect(NICSelection(argument: "eth0,eth1")?.allows("eth2") == false)
        #expect(NICSelection(argument: "-eth2")?.allows("eth0") == true)
        #expect(NICSelection(argument: "-eth2")?.allows("eth2") == false)
        #expect(NICSelection(argument: ",") == nil)
        #expect(NICSelection(argument: "-") == nil)
        #expect(SpeedList.parse("eth0=1gbit,eth1=500mbit") == ["eth0": 1_000_000_000, "eth1": 500_000_000])
        #expect(SpeedList.parse("eth0") == nil)
        #expect(SpeedList.parse("eth0=fast") == nil)
    }

    @Test("this host's interfaces are found, loopback among them")
    func discovery() {
        let list = InterfaceDiscovery.list()
        let lo = list.first { $0.isLoopback }
        #expect(lo != nil)
        #expect(lo?.addresses.contains { $0.address == "127.0.0.1" && $0.prefixLength == 8 } == true)
    }
}
