import FerryBench
import FerryIO
import Foundation
import Testing

/// The bench harness itself, on its smallest scenario (speeds are not asserted: they are
/// `ferry bench`'s to report, not the tests' to judge).
@Suite("Bench harness", .serialized, .enabled(if: Env.canRunEndToEnd && Command.exists("mptcpize"), "needs root, QEMU, the demo guest and mptcpize"))
struct BenchTests {
    /// The modes whose plumbing differs (a second, insecure daemon; a daemon on a too for
    /// ping-pong; ECMP routes; MPTCP endpoints): the others are these with other flags.
    /// FERRY_BENCH_ALL_MODES=1 runs every default mode.
    static let modes: [BenchMode] = ProcessInfo.processInfo.environment["FERRY_BENCH_ALL_MODES"] == "1" ? BenchMode.defaults
        : [.ferryMultichannel, .ferryPingPong, .ferryInsecure, .qemuOneStream, .qemuECMP, .qemuMPTCP]

    @Test("each kind of mode migrates the tiny guest and lands in the table, the JSON and the picture")
    func tiny() throws {
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("bench-\(getpid())").path
        let result = try Command.run([Env.ferry, "bench", "--scenario", "tiny", "--repeats", "1", "--out", out,
                                      "--modes", Self.modes.map(\.rawValue).joined(separator: ",")])
        #expect(result.succeeded, "\(result.stderr.suffix(3000))")
        let markdown = try String(contentsOfFile: out + "/bench.md", encoding: .utf8)
        for mode in Self.modes { #expect(markdown.contains(mode.label), "no row for \(mode.rawValue)") }
        #expect(markdown.contains("1/1"))
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let results = try decoder.decode([BenchResult].self, from: Data(contentsOf: URL(fileURLWithPath: out + "/bench.json")))
        let runs = try #require(results.first).runs
        #expect(runs.count == Self.modes.count)
        for run in runs {
            #expect(run.succeeded && run.guestOK, "\(run.mode.rawValue): \(run.error ?? "guest check failed")")
            #expect(run.ramBytes > 64 << 20, "\(run.mode.rawValue) moved the guest's memory")
            #expect(run.throughputBitsPerSecond > 0 && run.sourceQEMUCPUSeconds != nil)
            // The guest's 64 MiB of random fill cannot be compressed away: the NICs' counters
            // must show at least that (compress auto may shrink the rest of what QEMU sent).
            #expect(run.wireBytes >= 64 << 20, "\(run.mode.rawValue): the NICs' counters saw the traffic (\(run.wireBytes) bytes)")
            // The lab's client probed the guest's NIC through every mode's migration.
            let network = try #require(run.network, "\(run.mode.rawValue): no probe result")
            #expect(network.answered > 0 && network.tcpConnected && network.tcpBroken == nil, "\(run.mode.rawValue): \(network.summary)")
        }
        #expect(markdown.contains("The guest's network, from the client"), "no outage table")
        // Ferry and MPTCP used both NICs. (ECMP hashes QEMU's three flows onto the two
        // nexthops; a quarter of the time all three land on one: not asserted.)
        for run in runs where [.qemuMPTCP, .ferryMultichannel].contains(run.mode) {
            #expect(run.nicTxBytes.values.filter { $0 > 8 << 20 }.count == 2, "\(run.mode.rawValue) split \(run.nicTxBytes)")
        }
        let svg = try String(contentsOfFile: out + "/tiny.svg", encoding: .utf8)
        #expect(svg.hasPrefix("<svg") && svg.contains("<polyline"))
    }
}

@Suite("Bench lock", .enabled(if: getuid() == 0, "needs root (/run/ferry-lab)"))
struct BenchLockTests {
    @Test("a second ferry bench refuses with the first one's pid instead of tearing down its lab")
    func secondBenchRefuses() throws {
        let held = try BenchLock.acquire()
        defer { held.release() }
        let labBefore = FileManager.default.fileExists(atPath: "/run/ferry-lab/bench")
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("bench-lock-\(getpid())").path
        let result = try Command.run([Env.ferry, "bench", "--scenario", "tiny", "--repeats", "1", "--out", out])
        #expect(!result.succeeded)
        #expect(result.stderr.contains("another ferry bench is running on this machine (pid \(getpid()))"), "\(result.stderr.suffix(500))")
        #expect(FileManager.default.fileExists(atPath: "/run/ferry-lab/bench") == labBefore, "the refused bench touched the lab")
    }
}

@Suite("Bench scenarios")
struct BenchScenarioTests {
    @Test("line rates come from the tc rates: 2 x 1gbit is 2 Gbit/s, unlimited has none")
    func lineRates() throws {
        let byName = Dictionary(uniqueKeysWithValues: BenchScenario.catalog.map { ($0.name, $0) })
        #expect(byName["2x1gbit"]?.lineRateBitsPerSecond == 2e9)
        #expect(byName["1x1gbit-text"]?.lineRateBitsPerSecond == 1e9)
        #expect(byName["2xunlimited"]?.lineRateBitsPerSecond == nil)
    }
}
