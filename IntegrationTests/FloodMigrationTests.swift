import FerryIO
import FerryMigration
import Foundation
import Testing

/// Whole migrations while both daemons are flooded with silent connections from the lab's
/// own hosts, from both of each host's addresses (the source's control connection's among
/// them): each must connect within 2 s and complete. `FERRY_FLOOD_MIGRATIONS` (default 2,
/// in CI; docs/SECURITY.md gives 10) and `FERRY_FLOOD_CONNECTIONS` (default 1,000 per daemon).
@Suite("Migrations under a flood", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest"))
struct FloodMigrationTests {
    @Test("1,000 silent connections held against each daemon: migrations back and forth still connect within 2 s and complete")
    func migrationsUnderFlood() throws {
        let env = ProcessInfo.processInfo.environment
        let count = env["FERRY_FLOOD_MIGRATIONS"].flatMap { Int($0) } ?? 2
        let connections = env["FERRY_FLOOD_CONNECTIONS"].flatMap { Int($0) } ?? 1000
        SecurityTests.Flood.raiseDescriptorLimit()  // before the daemons start: they inherit it
        let lab = try TestLab(nics: 2, rate: "300mbit")
        try lab.serve(on: "a")
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("vm1", on: "a", memory: 256, fill: 64, dirty: 2)
        // Each host floods the other, from both its addresses, inside its own namespace.
        var floods: [SecurityTests.Flood] = []
        for (from, to) in [("a", "b"), ("b", "a")] {
            let sources = [lab.lab.address(from, nic: 0), lab.lab.address(from, nic: 1)]
            let target = lab.lab.address(to, nic: 0)
            floods.append(try Self.inNamespace(lab.lab.namespace(from)) {
                try SecurityTests.Flood(host: target, port: 7470, count: connections, addresses: sources, kind: .silent)
            })
        }
        defer { for flood in floods { _ = flood.stop() } }
        Thread.sleep(forTimeInterval: 0.5)
        var here = "a"
        var connectTimes: [Double] = []
        for i in 1...count {
            let there = here == "a" ? "b" : "a"
            let (result, report) = try lab.migrate("vm1", from: here, to: there)
            let r = try #require(report, "migration \(i): no report: \(result.stdout)\(result.stderr)")
            #expect(r.succeeded, "migration \(i), \(here) -> \(there), under the flood: \(r.error ?? "")")
            let connected = r.events.first { $0.what.hasPrefix("connected to") }?.at
            #expect(connected != nil && connected! < 2, "migration \(i): connected after \(connected.map { String(format: "%.2f s", $0) } ?? "never")")
            if let connected { connectTimes.append(connected) }
            guard r.succeeded else { break }
            here = there
        }
        let opened = floods.reduce(0) { $0 + $1.opened }
        let sorted = connectTimes.sorted()
        print("flood migrations: \(connectTimes.count) of \(count) connected, median \(String(format: "%.3f", sorted[sorted.count / 2])) s, "
              + "worst \(String(format: "%.3f", sorted.last ?? 0)) s; \(opened) flood connections opened")
        try lab.expectRunningAndHealthy("vm1", on: here)
    }

    /// Runs `body` on a thread inside network namespace `name`; threads it starts stay there.
    static func inNamespace<T: Sendable>(_ name: String, _ body: @escaping @Sendable () throws -> T) throws -> T {
        let result = Locked<Result<T, any Error>?>(nil)
        let thread = Thread {
            do {
                try enterNetworkNamespace(name)
            } catch {
                result.withLock { $0 = .failure(error) }
                return
            }
            let value = Result { try body() }
            result.withLock { $0 = value }
        }
        thread.start()
        while result.withLock({ $0 }) == nil { Thread.sleep(forTimeInterval: 0.01) }
        return try result.withLock { $0 }!.get()
    }
}
