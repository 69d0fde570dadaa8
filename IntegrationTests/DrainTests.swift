import FerryIO
import FerryLab
import FerryMetrics
import FerryMigration
import FerryVM
import FerryWire
import Foundation
import Testing

/// `ferry drain` on a lab of three hosts through a switch per NIC: a's VMs go to b and c.
@Suite("Drain", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest"))
struct DrainTests {
    static func decodeReport(_ json: String) -> DrainReport? {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try? decoder.decode(DrainReport.self, from: Data(json.utf8))
    }

    /// a's `/metrics`, fetched inside its namespace (the daemon listens on a's loopback).
    static func scrape(_ lab: TestLab) -> [String: Double]? {
        let script = "exec 3<>/dev/tcp/127.0.0.1/9470 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        guard let out = try? lab.shell("a", script), out.succeeded, out.stdout.hasPrefix("HTTP/1.1 200") else { return nil }
        return PrometheusText.parse(out.stdout)
    }

    @Test("four VMs drain from a to b and c: bad input changes nothing, the plan spreads them, a refuses a VM while draining, every VM runs healthy on one host; Ctrl-C lets the running migration finish and starts no other")
    func drainsFourVMs() throws {
        let lab = try TestLab(nics: 2, rate: "1gbit", hosts: 3)
        let (a, b, c) = (lab.a, lab.b, lab.host("c"))
        let bAddress = lab.lab.address("b", nic: 0), cAddress = lab.lab.address("c", nic: 0)
        // a's daemon serves metrics; the drain (its own process) reports to it.
        try lab.serve(on: "a", extra: ["--metrics", "9470"])
        // Room for two of a's VMs each, so the plan must use both.
        try lab.serve(on: "b", extra: ["--max-guest-memory", "600M"])
        let names = ["d1", "d2", "d3", "d4"]
        for name in names { _ = try lab.startDemoVM(name, on: "a", memory: 160, fill: 32, dirty: 2) }
        _ = try lab.startDemoVM("intruder", on: "b", memory: 128, fill: 16, dirty: 1)
        func stillOnA(_ why: String) throws {
            for name in names {
                #expect(try a.store.record(name).alive, "\(name) left a after \(why)")
                #expect((try? b.store.record(name)) == nil && (try? c.store.record(name)) == nil, "\(name) arrived somewhere after \(why)")
            }
        }

        // c runs no daemon yet: the drain cannot ask it, and stops before anything moves.
        let unreachable = try a.ferry(["drain", "--to", "\(bAddress),\(cAddress)", "--quiet"])
        #expect(!unreachable.succeeded && unreachable.stderr.contains("cannot reach ferry serve at \(cAddress)"), "\(unreachable.stdout)\(unreachable.stderr)")
        try stillOnA("a drain to a host without ferry serve")

        // b alone has room for two (600 MiB less the intruder's 128): the drain refuses.
        let noRoom = try a.ferry(["drain", "--to", bAddress, "--quiet"])
        #expect(noRoom.status == 1 && noRoom.stderr.contains("fit nowhere"), "\(noRoom.stdout)\(noRoom.stderr)")
        #expect(noRoom.stdout.contains("NOWHERE"), "\(noRoom.stdout)")
        try stillOnA("a drain with nowhere that fits")

        try lab.serve(on: "c", extra: ["--max-guest-memory", "600M"])
        let dryRun = try a.ferry(["drain", "--to", "\(bAddress),\(cAddress)", "--dry-run", "--json"])
        #expect(dryRun.succeeded, "\(dryRun.stderr)")
        #expect(dryRun.stdout.contains("dry run: nothing moved"))
        try stillOnA("a dry run")

        // The drain, in the background: while it runs, a refuses the intruder.
        let reportPath = lab.lab.directory + "/drain.json"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = try lab.lab.execArguments("a", [Env.ferry, "drain", "--to", "\(bAddress),\(cAddress)", "--per-destination", "1",
                                                            "--report-file", reportPath, "--quiet"])
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        // Scraped twice a second while the drain runs.
        let scrapes = Locked<[[String: Double]]>([])
        let scraping = Locked(true)
        let scraper = Thread {
            while scraping.withLock({ $0 }) {
                if let sample = Self.scrape(lab) { scrapes.withLock { $0.append(sample) } }
                Thread.sleep(forTimeInterval: 0.5)
            }
        }
        scraper.start()
        let marker = DrainMarker.path(runDirectory: lab.lab.stateDirectory("a") + "/run")
        var sawMarker = false
        for _ in 0..<100 where !sawMarker {
            sawMarker = FileManager.default.fileExists(atPath: marker)
            if !sawMarker { Thread.sleep(forTimeInterval: 0.05) }
        }
        #expect(sawMarker, "the drain never marked a as draining")
        // `ferry status --json` says so, for scripts.
        let status = try a.ferry(["status", "--json"])
        let object = try #require(try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any], "\(status.stdout)")
        let draining = object["draining"] as? [String: Any]
        #expect((draining?["destinations"] as? [String]) == [bAddress, cAddress], "\(status.stdout)")
        #expect((object["daemon"] as? [String: Any])?["running"] as? Bool == true)
        #expect(((object["vms"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String }.sorted() == names)
        let (refused, _) = try lab.migrate("intruder", from: "b", to: "a")
        #expect(refused.status == 1 && refused.stdout.contains("being drained"), "\(refused.stdout)\(refused.stderr)")
        #expect(try b.store.record("intruder").alive, "the refused VM must keep running on b")
        process.waitUntilExit()
        let printed = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(process.terminationStatus == 0, "\(printed)")
        #expect(!FileManager.default.fileExists(atPath: marker), "the drain's marker outlived it")
        print("drain:\n\(printed.suffix(1500))")

        let report = try #require(FileManager.default.contents(atPath: reportPath).flatMap { Self.decodeReport(String(decoding: $0, as: UTF8.self)) })
        #expect(report.entries.count == 4 && report.moved == 4)

        // The metrics, against the reports: four started and succeeded, the bytes each NIC
        // sent, a throughput and a downtime per migration; and, while it ran, the drain's
        // migrations showed as outgoing.
        Thread.sleep(forTimeInterval: 0.5)
        scraping.withLock { $0 = false }
        let final = try #require(Self.scrape(lab), "a's /metrics does not answer")
        let seen = scrapes.withLock { $0 }
        #expect(seen.count >= 4, "scraped \(seen.count) times during the drain")
        #expect(seen.contains { ($0[PrometheusText.key("ferry_migrations_running", ["direction": "outgoing"])] ?? 0) >= 1 },
                "no scrape saw the drain's migrations running")
        #expect(final[PrometheusText.key("ferry_migrations_started_total", ["role": "source"])] == 4)
        #expect(final[PrometheusText.key("ferry_migrations_ended_total", ["role": "source", "outcome": "succeeded"])] == 4)
        #expect(final["ferry_migration_throughput_bits_per_second_count"] == 4)
        #expect(final["ferry_migration_downtime_seconds_count"] == 4)
        var sent: [String: UInt64] = [:]
        for r in report.entries.compactMap(\.report) { for (nic, bytes) in r.payloadBytesByInterface { sent[nic, default: 0] += bytes } }
        #expect(!sent.isEmpty)
        for (nic, bytes) in sent {
            #expect(final[PrometheusText.key("ferry_nic_bytes_total", ["nic": nic, "direction": "sent"])] == Double(bytes),
                    "\(nic): the reports say \(bytes) bytes sent")
        }
        // Counters never went back between scrapes.
        for key in [PrometheusText.key("ferry_migrations_started_total", ["role": "source"])] + sent.keys.map({ PrometheusText.key("ferry_nic_bytes_total", ["nic": $0, "direction": "sent"]) }) {
            let values = seen.compactMap { $0[key] } + [final[key] ?? 0]
            #expect(zip(values, values.dropFirst()).allSatisfy { $0 <= $1 }, "\(key) went back: \(values)")
        }
        let placed = Dictionary(uniqueKeysWithValues: report.entries.map { ($0.vm, $0.destination) })
        #expect(Set(placed.values) == ["b", "c"], "both destinations take VMs: \(placed)")
        for name in names {
            let to = try #require(placed[name])
            lab.expectAbsent(name, on: "a")
            #expect((try? (to == "b" ? c : b).store.record(name)) == nil, "\(name) is on both b and c")
            try lab.expectRunningAndHealthy(name, on: to)
        }

        // c's two VMs back to a, one at a time, and Ctrl-C once the first is under way: the
        // first finishes, the second never starts and runs on at c.
        let onC = report.entries.filter { $0.destination == "c" }.map(\.vm).sorted()
        let stopped = Process()
        stopped.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        let stopReport = lab.lab.directory + "/drain-stopped.json"
        stopped.arguments = try lab.lab.execArguments("c", [Env.ferry, "drain", "--to", lab.lab.address("a", nic: 0), "--parallel", "1",
                                                            "--bandwidth", "200mbit", "--report-file", stopReport, "--quiet"])
        let stoppedOutput = Pipe()
        stopped.standardOutput = stoppedOutput
        stopped.standardError = stoppedOutput
        try stopped.run()
        let cMarker = DrainMarker.path(runDirectory: lab.lab.stateDirectory("c") + "/run")
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: cMarker) { Thread.sleep(forTimeInterval: 0.05) }
        Thread.sleep(forTimeInterval: 1)
        stopped.interrupt()
        stopped.waitUntilExit()
        let stoppedText = String(decoding: stoppedOutput.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(stopped.terminationStatus == 1, "a drain stopped early exits 1: \(stoppedText)")
        let partial = try #require(FileManager.default.contents(atPath: stopReport).flatMap { Self.decodeReport(String(decoding: $0, as: UTF8.self)) })
        #expect(partial.stopped)
        let states = Dictionary(uniqueKeysWithValues: partial.entries.map { ($0.vm, $0.state) })
        #expect(states.values.sorted { $0.rawValue < $1.rawValue } == [.notStarted, .succeeded], "\(states)\n\(stoppedText)")
        for (vm, state) in states {
            #expect(try (state == .succeeded ? a : c).store.record(vm).alive, "\(vm) (\(state)) is not where it should run")
        }
        #expect(Set(states.keys) == Set(onC))
    }
}
