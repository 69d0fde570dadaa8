import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import FerryWire
import Foundation
import Testing

/// Multichannel in the lab with real QEMU: shares per NIC, failover when a NIC dies or a
/// channel is killed, a NIC that comes back is used again, every NIC down.
@Suite("Multichannel in the lab", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest (scripts/test.sh)"))
struct MultichannelTests {
    /// Bytes each interface carried, from the report.
    func shares(_ r: MigrationReport) -> [String: UInt64] {
        var out: [String: UInt64] = [:]
        for c in r.channels { out[c.interface, default: 0] += c.payloadBytes }
        return out
    }

    @Test("NICs of unequal speed are filled in proportion to their rates")
    func proportional() throws {
        // Rates low enough that the links, not this machine's two cores, are the bottleneck.
        let lab = try TestLab(nics: 2, rate: "160mbit,80mbit")
        try lab.serve()
        _ = try lab.startDemoVM("vm1", memory: 320, fill: 160, dirty: 0)
        let (result, report) = try lab.migrate("vm1")
        #expect(result.succeeded, "\(result.stdout)")
        let r = try #require(report)
        #expect(r.nics.map(\.interface).sorted() == ["eth0", "eth1"])
        let s = shares(r)
        let total = Double(s.values.reduce(0, +))
        let eth0 = Double(s["eth0"] ?? 0) / total
        // eth0 has 2/3 of the capacity.
        #expect(eth0 > 0.58 && eth0 < 0.75, "eth0 carried \(Int(eth0 * 100))%, eth1 \(Int((1 - eth0) * 100))%")
        // Together they run near the sum of their rates (240 Mbit/s of TCP payload at most)
        // while the memory streams: the rate between the timeline samples where a tenth and
        // nine tenths of the bytes had crossed. The report's throughput also counts the
        // channels' set-up and the switchover, which on two loaded cores are CPU, not link.
        let moved = r.timeline.map { ($0.at, Double($0.interfaceBytes.values.reduce(0, +))) }
        let all = try #require(moved.last?.1)
        let from = try #require(moved.first { $0.1 >= 0.1 * all }), to = try #require(moved.first { $0.1 >= 0.9 * all })
        let streaming = (to.1 - from.1) * 8 / max(to.0 - from.0, 0.001)
        print("unequal NICs: streaming at \(Format.rate(streaming)), throughput over the whole transfer \(Format.rate(r.throughputBitsPerSecond ?? 0))")
        #expect(streaming > 0.8 * 240e6, "aggregate while streaming \(Format.rate(streaming))")
        try lab.expectRunningAndHealthy("vm1", on: "b")
    }

    @Test("--bandwidth and serve --max-bandwidth hold a migration to the limit over all NICs together")
    func bandwidthLimits() throws {
        // Unlimited NICs: only the limits can hold the rate down.
        let lab = try TestLab(nics: 2)
        try lab.serve(on: "b")
        try lab.serve(on: "a", extra: ["--max-bandwidth", "200mbit"])
        _ = try lab.startDemoVM("vm1", memory: 256, fill: 96, dirty: 0)
        func streamingRate(_ r: MigrationReport) -> Double {
            // Bytes over time between the first and the last timeline sample that moved data.
            let moving = r.timeline.filter { $0.interfaceBytes.values.reduce(0, +) > 0 }
            guard let first = moving.first, let last = moving.last, last.at > first.at else { return 0 }
            let bytes = last.interfaceBytes.values.reduce(0, +) - first.interfaceBytes.values.reduce(0, +)
            return Double(bytes) * 8 / (last.at - first.at)
        }
        let (out, outReport) = try lab.migrate("vm1", extra: ["--bandwidth", "160mbit"])
        #expect(out.succeeded, "\(out.stdout)")
        let capped = streamingRate(try #require(outReport))
        #expect(capped < 1.1 * 160e6 && capped > 0.6 * 160e6, "--bandwidth 160mbit: \(Format.rate(capped))")
        #expect(Set(try #require(outReport).channels.filter { $0.payloadBytes > 0 }.map(\.interface)) == ["eth0", "eth1"], "both NICs carried it")

        let (back, backReport) = try lab.migrate("vm1", from: "b", to: "a")
        #expect(back.succeeded, "\(back.stdout)")
        let r = try #require(backReport)
        #expect(r.events.contains { $0.what.contains("destination limits this migration") }, "\(r.events.map(\.what))")
        let limited = streamingRate(r)
        #expect(limited < 1.1 * 200e6 && limited > 0.6 * 200e6, "serve --max-bandwidth 200mbit: \(Format.rate(limited))")
        try lab.expectRunningAndHealthy("vm1", on: "a")
    }

    @Test("a NIC that dies a third of the way loses nothing, is used again when it comes back, and dies again near the end (sealed and copied; spliced, zero-copy)",
          arguments: ["sealed", "zero-copy"])
    func nicDownUpDown(path: String) throws {
        let zeroCopy = path == "zero-copy"
        let lab = try TestLab(nics: 2, rate: "150mbit")
        try lab.serve(extra: zeroCopy ? ["--insecure"] : [])
        _ = try lab.startDemoVM("vm1", memory: 384, fill: 256, dirty: 2)
        let run = RunningMigration(lab, "vm1", extra: zeroCopy ? ["--insecure", "--compress", "none"] : [])
        #expect(run.wait(forFraction: 0.33), "the migration never reached a third")
        try lab.lab.setNIC("a", nic: 1, up: false)
        #expect(run.wait(forFraction: 0.5))
        try lab.lab.setNIC("a", nic: 1, up: true)
        // Near the end: the guest's 256 MiB of data make at least 256 MiB of stream.
        #expect(run.wait(forStreamBytes: 200 << 20), "the migration ended before 200 MiB: \(run.progress.last.map { "\($0.phase) \($0.streamBytes)" } ?? "no progress")")
        try lab.lab.setNIC("b", nic: 1, up: false)  // the far end this time: a sees the carrier go
        let (result, report) = try run.finish()
        #expect(result.succeeded, "\(result.stdout)")
        let r = try #require(report)
        let events = r.events.map(\.what)
        #expect(events.filter { $0.contains("NIC eth1 lost carrier") }.count == 2, "\(events)")
        let back = try #require(r.events.first { $0.what.contains("NIC eth1 is back") }, "\(events)")
        // eth1 carried data after it came back.
        let atBack = r.timeline.last { $0.at <= back.at }?.interfaceBytes["eth1"] ?? 0
        let later = r.timeline.last?.interfaceBytes["eth1"] ?? 0
        #expect(later > atBack + (8 << 20), "eth1 carried \(later - atBack) bytes after it came back")
        #expect(r.retransmittedBytes > 0, "the dead NIC's chunks were sent again")
        #expect(r.dataPath?.hasPrefix(zeroCopy ? "zero-copy" : "copied") == true, "\(r.dataPath ?? "no data path")")
        try lab.lab.setNIC("b", nic: 1, up: true)
        try lab.expectRunningAndHealthy("vm1", on: "b")
        lab.expectAbsent("vm1", on: "a")
    }

    @Test("the control connection's NIC dies mid-transfer: the control connection continues over the other NIC and the migration completes")
    func controlNICDown() throws {
        let lab = try TestLab(nics: 2, rate: "150mbit")
        try lab.serve()
        _ = try lab.startDemoVM("vm1", memory: 320, fill: 192, dirty: 2)
        // `--to` is b's eth0 address: the control connection runs over eth0.
        let run = RunningMigration(lab, "vm1")
        #expect(run.wait(forFraction: 0.3))
        try lab.lab.setNIC("a", nic: 0, up: false)
        let (result, report) = try run.finish()
        try lab.lab.setNIC("a", nic: 0, up: true)
        #expect(result.succeeded, "\(result.stdout)")
        let r = try #require(report)
        let events = r.events.map(\.what)
        let moved = events.first { $0.contains("control connection over eth0") && $0.contains("continued over eth1") }
        #expect(moved != nil, "\(events)")
        #expect(events.contains { $0.contains("NIC eth0 lost carrier") }, "\(events)")
        try lab.expectRunningAndHealthy("vm1", on: "b")
        lab.expectAbsent("vm1", on: "a")
    }

    @Test("before the offer is accepted: --to a name with an address per NIC of the destination, the first NIC down; ferry migrate connects over the next")
    func connectOverAnotherAddress() throws {
        let lab = try TestLab(nics: 2, rate: "300mbit")
        try lab.serve()
        _ = try lab.startDemoVM("vm1", memory: 256, fill: 64, dirty: 2)
        // `ip netns exec` puts /etc/netns/NAME/hosts over /etc/hosts for the command it runs.
        let hostsDirectory = "/etc/netns/\(lab.lab.namespace("a"))"
        try FileManager.default.createDirectory(atPath: hostsDirectory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: hostsDirectory) }
        try "\(lab.lab.address("b", nic: 0)) host-b\n\(lab.lab.address("b", nic: 1)) host-b\n"
            .write(toFile: hostsDirectory + "/hosts", atomically: true, encoding: .utf8)
        try lab.lab.setNIC("a", nic: 0, up: false)
        defer { try? lab.lab.setNIC("a", nic: 0, up: true) }
        let reportPath = lab.lab.directory + "/report-by-name.json"
        let result = try lab.a.ferry(["migrate", "vm1", "--to", "host-b", "--report-file", reportPath, "--quiet"])
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let report = try decoder.decode(MigrationReport.self, from: try #require(FileManager.default.contents(atPath: reportPath)))
        #expect(report.nics.map(\.interface) == ["eth1"], "\(report.nics)")
        try lab.expectRunningAndHealthy("vm1", on: "b")
    }

    @Test("a destination of protocol v1: the migration runs as before, and the report says its control connection cannot move")
    func protocolOne() throws {
        let lab = try TestLab(nics: 2, rate: "300mbit")
        setenv("FERRY_PROTOCOL_MAX", "1", 1)
        defer { unsetenv("FERRY_PROTOCOL_MAX") }
        try lab.serve()  // speaks v1 only: the variable is in its environment
        unsetenv("FERRY_PROTOCOL_MAX")
        _ = try lab.startDemoVM("vm1", memory: 256, fill: 64, dirty: 2)
        let (result, report) = try lab.migrate("vm1")
        #expect(result.succeeded, "\(result.stdout)")
        let events = try #require(report).events.map(\.what)
        #expect(events.contains { $0.contains("protocol v1") && $0.contains("cannot move") }, "\(events)")
        try lab.expectRunningAndHealthy("vm1", on: "b")
    }

    @Test("channels killed from outside (ss -K) mid-migration: the others carry on, the NIC gets channels again")
    func channelsKilled() throws {
        let lab = try TestLab(nics: 2, rate: "150mbit")
        try lab.serve()
        _ = try lab.startDemoVM("vm1", memory: 320, fill: 192, dirty: 2)
        let run = RunningMigration(lab, "vm1")
        #expect(run.wait(forFraction: 0.3))
        let killed = try lab.shell("a", "ss -K dst \(lab.lab.address("b", nic: 1))")
        #expect(killed.succeeded, "\(killed.stderr)")
        let (result, report) = try run.finish()
        #expect(result.succeeded, "\(result.stdout)")
        let r = try #require(report)
        #expect(r.events.contains { $0.what.contains("failed") && $0.what.contains("eth1") }, "\(r.events.map(\.what))")
        #expect(r.events.contains { $0.what.contains("NIC eth1 is back") }, "\(r.events.map(\.what))")
        try lab.expectRunningAndHealthy("vm1", on: "b")
    }

    @Test("every NIC down: the migration fails within the link timeout and the VM runs on the source")
    func allNICsDown() throws {
        let lab = try TestLab(nics: 2, rate: "100mbit")
        try lab.serve()
        let source = try lab.startDemoVM("vm1", memory: 320, fill: 192, dirty: 2)
        let run = RunningMigration(lab, "vm1", extra: ["--link-timeout", "3s"])
        #expect(run.wait(forFraction: 0.25))
        let downAt = ContinuousClock.now
        try lab.lab.setNIC("a", nic: 0, up: false)
        try lab.lab.setNIC("a", nic: 1, up: false)
        let (result, report) = try run.finish(timeout: .seconds(60))
        let took = ContinuousClock.now - downAt
        #expect(result.status == 1, "\(result.stdout)")
        #expect(report?.outcome == .failedVMOnSource)
        #expect(took < .seconds(20), "failing took \(took)")
        #expect(ProcessStats.isAlive(pid: source.state.pid))
        try lab.expectRunningAndHealthy("vm1", on: "a")
        try lab.lab.setNIC("a", nic: 0, up: true)
        try lab.lab.setNIC("a", nic: 1, up: true)
        // The destination notices the source is gone and discards its copy.
        let deadline = ContinuousClock.now + .seconds(30)
        while (try? lab.b.store.record("vm1")) != nil && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.2) }
        lab.expectAbsent("vm1", on: "b")
    }

    @Test("garbage and an unbound channel on the data port are refused without disturbing the migration in flight")
    func intruders() throws {
        let lab = try TestLab(nics: 2, rate: "150mbit")
        try lab.serve()
        _ = try lab.startDemoVM("vm1", memory: 320, fill: 192, dirty: 2)
        let run = RunningMigration(lab, "vm1")
        #expect(run.wait(forFraction: 0.3))
        // A bind for a session that does not exist, one with a forged proof for a real-looking
        // session, and plain garbage, on both NICs.
        let forged = ControlCoding.frame(.bind, BindMessage(version: 1, session: Hex.random(byteCount: 16), channel: 0,
                                                            interface: "eth0", proof: Hex.random(byteCount: 32)))
        let path = lab.lab.directory + "/forged.bin"
        try Data(forged.encoded()).write(to: URL(fileURLWithPath: path))
        for nic in 0..<2 {
            let b = lab.lab.address("b", nic: nic)
            try lab.shell("a", "cat \(path) > /dev/tcp/\(b)/7470; head -c 300000 /dev/urandom > /dev/tcp/\(b)/7470; printf 'FERY\\001' > /dev/tcp/\(b)/7470")
        }
        let (result, report) = try run.finish()
        #expect(result.succeeded, "\(result.stdout)")
        #expect(report?.retransmittedBytes == 0, "nothing was disturbed")
        let log = GuestConsole(path: lab.b.serveLog).text
        #expect(log.contains("refused data channel") || log.contains("unknown-session") || log.contains("no such session"), "\(log.suffix(2000))")
        #expect(log.contains("refused connection"))
        try lab.expectRunningAndHealthy("vm1", on: "b")
    }
}
