import FerryIO
@testable import FerryVM
import FerryWire
import Foundation
import Testing

@Suite("Guest NICs: MACs, tap names, the spec's rules, taps and bridges in the kernel")
struct GuestNICTests {
    @Test("MACs: normalized to lowercase with colons; a group address, the zero address and malformed text refused")
    func macs() {
        #expect(NICSpec.normalizedMAC("52:54:00:AB:cd:01") == "52:54:00:ab:cd:01")
        #expect(NICSpec.normalizedMAC("52-54-00-ab-cd-01") == "52:54:00:ab:cd:01")
        for bad in ["01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:ab:cd", "52:54:00:ab:cd:0g", "525400abcd01", "52:54:00:ab:cd:01:02", "5:54:00:ab:cd:01", ""] {
            #expect(NICSpec.normalizedMAC(bad) == nil, "\(bad)")
        }
    }

    @Test("a tap's name fits Linux's 15 characters and follows from the MAC, which is unique on a host")
    func tapNames() {
        let a = NICSpec(bridge: "br0", mac: "52:54:00:ab:cd:01", model: "virtio-net-pci")
        let b = NICSpec(bridge: "br0", mac: "52:54:00:ab:cd:02", model: "virtio-net-pci")
        #expect(a.tapName == "fy525400abcd01" && a.tapName.utf8.count <= 15)
        #expect(a.tapName != b.tapName)
    }

    @Test("a generated MAC is QEMU's prefix, the same for the same VM and NIC, and avoids the MACs taken")
    func generated() {
        let first = GuestNICs.generatedMAC(vm: "web1", index: 0, taken: [])
        #expect(first.hasPrefix("52:54:00:") && NICSpec.normalizedMAC(first) == first)
        #expect(GuestNICs.generatedMAC(vm: "web1", index: 0, taken: []) == first)
        #expect(GuestNICs.generatedMAC(vm: "web1", index: 1, taken: []) != first)
        #expect(GuestNICs.generatedMAC(vm: "web2", index: 0, taken: []) != first)
        let other = GuestNICs.generatedMAC(vm: "web1", index: 0, taken: [first])
        #expect(other != first && other.hasPrefix("52:54:00:"))
    }

    @Test("the spec's rules: an old spec without NICs reads as none; a malformed MAC, bridge or model, or one MAC twice, is damage")
    func specRules() throws {
        let nic = NICSpec(bridge: "br0", mac: "52:54:00:00:00:01", model: "virtio-net-pci")
        var spec = VMSpec(name: "v", memoryMiB: 64, cpus: 1, kernel: BootFile(name: "k", byteCount: 1, sha256: String(repeating: "a", count: 64)),
                          initrd: nil, append: "", accelerator: .tcg, machine: "pc-i440fx-7.2", cpuModel: "qemu64", nics: [nic])
        #expect(StateFileCoding.check(spec, vm: "v") == nil)
        let data = try JSONEncoder().encode(spec)
        var object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        object.removeValue(forKey: "nics")
        let old = try JSONDecoder().decode(VMSpec.self, from: JSONSerialization.data(withJSONObject: object))
        #expect(old.nics.isEmpty)
        for bad in [NICSpec(bridge: "br0", mac: "52:54:00:00:00:0G", model: "virtio-net-pci"),
                    NICSpec(bridge: "br0", mac: "52:54:00:00:00:0A", model: "virtio-net-pci"),
                    NICSpec(bridge: "a,b", mac: "52:54:00:00:00:02", model: "virtio-net-pci"),
                    NICSpec(bridge: "a-very-long-bridge", mac: "52:54:00:00:00:02", model: "virtio-net-pci"),
                    NICSpec(bridge: "br0", mac: "52:54:00:00:00:02", model: "virtio-net-pci,romfile=/x")] {
            spec.nics = [bad]
            #expect(StateFileCoding.check(spec, vm: "v") != nil, "\(bad)")
        }
        spec.nics = [nic, nic]
        #expect(StateFileCoding.check(spec, vm: "v") == "gives one MAC to two NICs")
    }

    @Test("QEMU's options: a tap by descriptor, no vhost, no option ROM, the MAC")
    func qemuOptions() {
        let nics = [NICSpec(bridge: "br0", mac: "52:54:00:00:00:01", model: "virtio-net-pci"),
                    NICSpec(bridge: "br1", mac: "52:54:00:00:00:02", model: "e1000")]
        #expect(GuestNICs.qemuArguments(nics, fds: [7, 8]) == [
            "-netdev", "tap,id=net0,fd=7,vhost=off", "-device", "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:00:00:01,romfile=",
            "-netdev", "tap,id=net1,fd=8,vhost=off", "-device", "e1000,netdev=net1,id=nic1,mac=52:54:00:00:00:02,romfile=",
        ])
    }

    @Test("descriptors passed to a child arrive at the numbers given, open, whatever close-on-exec says here")
    func passingDescriptors() throws {
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        defer { close(fds[0]) }
        let numbers = Command.childDescriptors(passing: [fds[1]])
        #expect(numbers == [max(fds[1] + 1, 3)])
        let result = try Command.run(["sh", "-c", "echo through > /proc/self/fd/\(numbers[0])"], passing: [fds[1]])
        close(fds[1])
        #expect(result.succeeded, "\(result.stderr)")
        var buffer = [UInt8](repeating: 0, count: 64)
        let n = read(fds[0], &buffer, buffer.count)
        #expect(n > 0 && String(decoding: buffer[0..<max(0, n)], as: UTF8.self) == "through\n")
    }

    @Test("a tap in the kernel: made down and on no bridge, put on its bridge and up, shared with another holder by pidfd, gone with its last descriptor",
          .enabled(if: getuid() == 0 && Command.exists("ip"), "needs root and iproute2"))
    func tapLifecycle() throws {
        // In this host's namespace (sysfs shows the namespace it was mounted in), under
        // names no one else uses: a bridge and a MAC of this run.
        let tag = String(format: "%04x", UInt16.random(in: 0...0xffff))
        let bridge = "fytbr\(tag)"
        try Command.check(["ip", "link", "add", bridge, "type", "bridge"])
        defer { _ = try? Command.run(["ip", "link", "del", bridge]) }
        let nic = NICSpec(bridge: bridge, mac: "52:54:00:77:\(tag.prefix(2)):\(tag.suffix(2))", model: "virtio-net-pci")
        let taps = try TapSet.create([nic])
        #expect(GuestNICs.interfaceExists(nic.tapName), "the tap does not exist")
        #expect(GuestNICs.master(of: nic.tapName) == nil, "a new tap is on a bridge")
        #expect(throws: VMError.self) { _ = try TapSet.create([nic]) }  // one holder only
        try GuestNICs.connect([nic])
        #expect(GuestNICs.master(of: nic.tapName) == bridge, "connect did not put it on \(bridge)")
        let flags = (try? String(contentsOfFile: "/sys/class/net/\(nic.tapName)/flags", encoding: .utf8)) ?? "0x0"
        #expect((Int(flags.trimmingCharacters(in: .whitespacesAndNewlines).dropFirst(2), radix: 16) ?? 0) & 1 == 1, "the tap is not up")
        try GuestNICs.connect([nic])  // again: nothing to do
        let shared = try TapSet.borrow([nic], from: getpid())
        taps.close()
        #expect(GuestNICs.interfaceExists(nic.tapName), "the tap went with one of two descriptors")
        shared.close()
        #expect(!GuestNICs.interfaceExists(nic.tapName), "the tap outlived its last descriptor")
    }
}
