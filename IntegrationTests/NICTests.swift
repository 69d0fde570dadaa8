import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import FerryWire
import Foundation
import Testing

/// Guest NICs, end to end: the demo guest on the lab's VM network (a bridge on each host,
/// a switch, a client), its echo service probed from the client while it moves.
@Suite("Guest NICs", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest"))
struct NICTests {
    static let nic = "bridge=\(Lab.vmBridge)"

    /// A demo guest with one NIC on the VM network at lab guest address `n`, its echo up.
    static func startGuest(_ lab: TestLab, _ name: String, n: Int, on host: String = "a", nic: String = nic) throws -> (VMRecord, String) {
        let address = lab.lab.guestAddress(n)
        let record = try lab.startDemoVM(name, on: host, memory: 192, fill: 32, dirty: 2, nics: [nic],
                                         append: " ferry.ip=\(address)/\(Lab.vmNetworkPrefix)")
        let console = GuestConsole(path: record.paths.serialLog)
        try #require(console.wait(timeout: .seconds(30)) { $0.contains("FERRY-NET-ECHO") }, "the guest's echo never started: \(console.text.suffix(800))")
        return (record, address)
    }

    /// The state of interface `name` on `host`: nil if absent, else its bridge and whether it is up.
    static func link(_ lab: TestLab, _ host: String, _ name: String) -> (master: String?, up: Bool)? {
        guard let out = try? Command.run(["ip", "-n", lab.lab.namespace(host), "-o", "link", "show", "dev", name]), out.succeeded else { return nil }
        let words = out.stdout.split(separator: " ").map(String.init)
        let master = words.firstIndex(of: "master").map { words[$0 + 1] }
        let flags = out.stdout.split(separator: "<").dropFirst().first?.split(separator: ">").first ?? ""
        return (master, flags.split(separator: ",").contains("UP"))
    }

    /// The switch's port for `mac` (host-a, host-b, client), from its forwarding table.
    static func switchPort(_ lab: TestLab, mac: String) -> String? {
        let out = (try? Command.run(["bridge", "-n", lab.lab.namespace(Lab.switchNamespace), "fdb", "show", "br", "sw0"]).stdout) ?? ""
        guard let line = out.split(separator: "\n").first(where: { $0.hasPrefix(mac + " ") }) else { return nil }
        let words = line.split(separator: " ").map(String.init)
        return words.firstIndex(of: "dev").map { words[$0 + 1] }
    }

    @Test("a VM with a NIC goes a -> b -> a: the client's TCP connection holds with every byte echoed, the network comes back at the guest's resume, the tap follows the VM")
    func pingPong() throws {
        let lab = try TestLab(nics: 2)
        try lab.serve(on: "a")
        try lab.serve(on: "b")
        let (record, address) = try Self.startGuest(lab, "vm1", n: 1)
        let nic = try #require(record.spec.nics.first)
        #expect(nic.model == "virtio-net-pci" && nic.mac.hasPrefix("52:54:00:") && nic.bridge == Lab.vmBridge)
        #expect(Self.link(lab, "a", nic.tapName).map { $0.master == Lab.vmBridge && $0.up } == true, "a's tap is not on the bridge")
        let probe = try ClientProbe(lab: lab.lab, binary: Env.ferry, address: address)
        Thread.sleep(forTimeInterval: 1)

        for (from, to) in [("a", "b"), ("b", "a")] {
            let (result, report) = try lab.migrate("vm1", from: from, to: to, extra: ["--probe", address])
            #expect(result.succeeded, "\(from) -> \(to): \(result.stdout)\(result.stderr)")
            let r = try #require(report)
            print("NIC ping-pong \(from) -> \(to): \(r.text.split(separator: "\n").filter { $0.contains("pause") || $0.contains("network") || $0.contains("guest NICs") || $0.contains("downtime") }.joined(separator: "\n"))")
            // The tap moved with the VM: on the bridge and up where it runs, gone where it was.
            #expect(Self.link(lab, to, nic.tapName).map { $0.master == Lab.vmBridge && $0.up } == true, "\(to)'s tap is not on the bridge, up")
            #expect(Self.link(lab, from, nic.tapName) == nil, "\(from) still has the tap")
            #expect(r.guestNICs?.nics == ["eth0 \(nic.mac) on \(Lab.vmBridge)"])
            #expect(r.guestNICs?.announcedAfterResumeMilliseconds != nil, "the destination never announced the guest")
            // The source host's own probe: answered again after the move, never for long.
            let seen = try #require(r.network)
            #expect(seen.answered > 0 && seen.tcpConnected && seen.tcpBroken == nil, "from the source: \(seen.summary)")
            // The switch learned the guest's new port from the announcement.
            #expect(ChaosTests.waitUntil(timeout: .seconds(5)) { Self.switchPort(lab, mac: nic.mac) == "host-\(to)" },
                    "the switch still sends \(nic.mac) to \(Self.switchPort(lab, mac: nic.mac) ?? "nowhere")")
        }
        let seen = try probe.stop()
        print("NIC ping-pong, client: \(seen.summary)")
        #expect(seen.tcpConnected && seen.tcpBroken == nil, "the client's TCP connection broke: \(seen.summary)")
        #expect(seen.tcpBytesEchoed == seen.tcpBytesSent && seen.tcpBytesEchoed > 0)
        // Without the announcement the switch would keep sending to the old host until its
        // entry aged out (300 s): seconds, not a pause's milliseconds.
        #expect(seen.answered > 0 && seen.outageMilliseconds < 2000, "outage: \(seen.summary)")
        try lab.expectRunningAndHealthy("vm1", on: "a")
    }

    @Test("soak: one client TCP connection across FERRY_SOAK_COUNT ping-pong migrations (default 20) holds, every byte echoed",
          .enabled(if: Env.runSoaks, "a soak (FERRY_SOAKS=1)"))
    func pingPongSoak() throws {
        let count = ProcessInfo.processInfo.environment["FERRY_SOAK_COUNT"].flatMap { Int($0) } ?? 20
        let lab = try TestLab(nics: 2, rate: "1gbit")
        try lab.serve(on: "a")
        try lab.serve(on: "b")
        let (_, address) = try Self.startGuest(lab, "vm4", n: 4)
        let probe = try ClientProbe(lab: lab.lab, binary: Env.ferry, address: address)
        var pauses: [Double] = [], outages: [Double] = [], lost: [Int] = []
        var host = "a"
        for i in 0..<count {
            let other = host == "a" ? "b" : "a"
            let (result, report) = try lab.migrate("vm4", from: host, to: other, extra: ["--probe", address])
            #expect(result.succeeded, "migration \(i + 1), \(host) -> \(other): \(result.stdout)")
            if let pause = report?.pause?.guestPauseMilliseconds, let seen = report?.network {
                pauses.append(pause)
                outages.append(seen.outageMilliseconds)
                lost.append(seen.lost)
                #expect(seen.tcpBroken == nil, "migration \(i + 1): the source's TCP connection broke: \(seen.summary)")
            }
            host = other
        }
        Thread.sleep(forTimeInterval: 1)
        let seen = try probe.stop()
        func median(_ v: [Double]) -> Double { v.isEmpty ? 0 : v.sorted()[v.count / 2] }
        print(String(format: "NIC soak, %d migrations: client %@; per migration (from the source host): pause p50 %.0f ms, outage p50 %.0f ms (max %.0f), lost p50 %d",
                     count, seen.summary, median(pauses), median(outages), outages.max() ?? 0, lost.isEmpty ? 0 : lost.sorted()[lost.count / 2]))
        #expect(seen.tcpConnected && seen.tcpBroken == nil && seen.tcpBytesEchoed == seen.tcpBytesSent, "\(seen.summary)")
        try lab.expectRunningAndHealthy("vm4", on: host)
    }

    @Test("a migration cancelled after the destination loaded the VM: b's tap stayed off the bridge, nothing was announced from b, the guest's network stays on a")
    func rollback() throws {
        let lab = try TestLab(nics: 2)
        let marks = lab.lab.directory + "/fault-marks"
        // b holds still once it has loaded the VM (QEMU has announced it there, as it does
        // at load) and recorded `prepared`; the source, waiting for `loaded`, has not reached
        // its commit point, so the operator's cancel rolls the migration back.
        setenv("FERRY_FAULT_PAUSE", "\(FaultPoint.destinationAfterPrepared.rawValue):6", 1)
        setenv("FERRY_FAULT_MARK", marks, 1)
        try lab.serve(on: "b")
        unsetenv("FERRY_FAULT_PAUSE")
        unsetenv("FERRY_FAULT_MARK")
        let (record, address) = try Self.startGuest(lab, "vm2", n: 2)
        let nic = try #require(record.spec.nics.first)
        let probe = try ClientProbe(lab: lab.lab, binary: Env.ferry, address: address)
        let run = RunningMigration(lab, "vm2")
        let reached = ChaosTests.waitUntil(timeout: .seconds(60)) {
            (try? String(contentsOfFile: marks, encoding: .utf8))?.contains(FaultPoint.destinationAfterPrepared.rawValue) == true
        }
        try #require(reached, "the destination never loaded the VM")
        let held = Self.link(lab, "b", nic.tapName)
        #expect(held != nil && held?.master == nil && held?.up == false, "b's tap before the commit: \(String(describing: held))")
        let cancel = try lab.a.ferry(["migrate", "--cancel", "vm2"])
        #expect(cancel.succeeded, "\(cancel.stdout)\(cancel.stderr)")
        let (result, report) = try run.finish(timeout: .seconds(60))
        #expect(!result.succeeded)
        #expect(report?.outcome == .cancelled, "\(result.stdout)")
        // b discards its copy once its pause is over; its tap goes with its QEMU.
        let discarded = ChaosTests.waitUntil(timeout: .seconds(30)) {
            (try? lab.b.store.record("vm2")) == nil && Self.link(lab, "b", nic.tapName) == nil
        }
        #expect(discarded, "b kept the VM or its tap")
        #expect(Self.link(lab, "a", nic.tapName).map { $0.master == Lab.vmBridge && $0.up } == true, "a's tap left the bridge")
        #expect(Self.switchPort(lab, mac: nic.mac) == "host-a", "the switch learned another port: \(Self.switchPort(lab, mac: nic.mac) ?? "none")")
        // Long enough for TCP's retransmission after the pause.
        Thread.sleep(forTimeInterval: 3)
        let seen = try probe.stop()
        print("NIC rollback, client: \(seen.summary)")
        #expect(seen.tcpConnected && seen.tcpBroken == nil && seen.tcpBytesEchoed == seen.tcpBytesSent, "\(seen.summary)")
        #expect(seen.answered > seen.lost, "\(seen.summary)")
        try lab.expectRunningAndHealthy("vm2", on: "a")
    }

    @Test("a same-host update keeps the NIC: the new QEMU takes over the same tap, the client's TCP connection holds")
    func update() throws {
        let lab = try TestLab(nics: 1)
        let (record, address) = try Self.startGuest(lab, "vm3", n: 3)
        let nic = try #require(record.spec.nics.first)
        let probe = try ClientProbe(lab: lab.lab, binary: Env.ferry, address: address)
        Thread.sleep(forTimeInterval: 1)
        let result = try lab.a.ferry(["vm", "update", "vm3", "--quiet"])
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        let after = try lab.a.store.record("vm3")
        #expect(after.state.pid != record.state.pid, "the same QEMU runs the VM")
        #expect(Self.link(lab, "a", nic.tapName).map { $0.master == Lab.vmBridge && $0.up } == true)
        let seen = try probe.stop()
        print("NIC update, client: \(seen.summary)")
        #expect(seen.tcpConnected && seen.tcpBroken == nil && seen.tcpBytesEchoed == seen.tcpBytesSent, "\(seen.summary)")
        #expect(seen.answered > 0 && seen.outageMilliseconds < 2000, "\(seen.summary)")
        try lab.expectRunningAndHealthy("vm3", on: "a")
    }

    @Test("bad NICs are refused with a clear error before anything moves: a missing bridge on either host, a malformed or taken MAC, an unknown model")
    func badInput() throws {
        let lab = try TestLab(nics: 1)
        try lab.serve(on: "b")
        let guest = Env.guest
        func run(_ host: String, _ name: String, _ nic: String) throws -> CommandResult {
            try lab.host(host).ferry(["vm", "run", name, "--memory", "64M", "--kernel", guest.kernel, "--initrd", guest.initrd,
                                      "--append", "console=ttyS0 ferry.workload=0", "--nic", nic])
        }
        var r = try run("a", "bad1", "bridge=nosuchbr0")
        #expect(!r.succeeded && r.stderr.contains("bridge 'nosuchbr0'") && r.stderr.contains("does not exist"), "\(r.stderr)")
        r = try run("a", "bad2", "bridge=\(Lab.vmBridge),mac=52:54:00:zz:00:01")
        #expect(!r.succeeded && r.stderr.contains("is malformed"), "\(r.stderr)")
        r = try run("a", "bad3", "bridge=\(Lab.vmBridge),mac=01:00:5e:00:00:01")
        #expect(!r.succeeded && r.stderr.contains("is malformed"), "a multicast MAC: \(r.stderr)")
        r = try run("a", "bad4", "bridge=\(Lab.vmBridge),model=no-such-nic")
        #expect(!r.succeeded && r.stderr.contains("no network device model 'no-such-nic'") && r.stderr.contains("virtio-net-pci"), "\(r.stderr)")
        #expect(lab.a.store.list().isEmpty, "a refused VM was left: \(lab.a.store.list().map(\.spec.name))")

        // A MAC another VM of the host has: refused at vm run, and at the destination.
        let mac = "52:54:00:aa:00:01"
        r = try run("a", "one", "bridge=\(Lab.vmBridge),mac=\(mac)")
        #expect(r.succeeded, "\(r.stderr)")
        r = try run("a", "two", "bridge=\(Lab.vmBridge),mac=\(mac.uppercased())")
        #expect(!r.succeeded && r.stderr.contains("already used by VM 'one'"), "\(r.stderr)")
        r = try run("b", "three", "bridge=\(Lab.vmBridge),mac=\(mac)")
        #expect(r.succeeded, "\(r.stderr)")
        var (m, report) = try lab.migrate("one")
        #expect(!m.succeeded && (report?.error ?? "").contains("already used by VM 'three'"), "\(report?.error ?? m.stderr)")
        #expect((try? lab.a.store.record("one"))?.alive == true, "the VM left a")

        // The destination has no such bridge.
        _ = try Command.check(["ip", "-n", lab.lab.namespace("b"), "link", "del", Lab.vmBridge])
        r = try run("a", "four", "bridge=\(Lab.vmBridge)")
        #expect(r.succeeded, "\(r.stderr)")
        (m, report) = try lab.migrate("four")
        #expect(!m.succeeded && (report?.error ?? "").contains("bridge '\(Lab.vmBridge)'") && (report?.error ?? "").contains("does not exist on"), "\(report?.error ?? m.stderr)")
        #expect((try? lab.a.store.record("four"))?.alive == true, "the VM left a")
        #expect((try? lab.b.store.record("four")) == nil, "b kept something of it")
    }
}
