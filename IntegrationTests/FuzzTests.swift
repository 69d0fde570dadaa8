import FerryIO
import Foundation
import Testing

/// libFuzzer against FerryWire's frame decoder, message decoders and handshake parser
/// (Sources/FerryFuzz), through scripts/fuzz.sh for a bounded time. No root needed.
enum FuzzRun {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().path
    static let script = repository + "/scripts/fuzz.sh"
    /// Its own corpus and artifacts, kept after the run so that a crash can be replayed.
    static let directory = repository + "/.build/fuzz/test"
    static let seconds = 20

    /// The script builds the fuzz binary (a no-op after scripts/test.sh has), so it needs swift.
    static var canRun: Bool { FileManager.default.fileExists(atPath: script) && Command.exists("swift") }

    /// A figure from libFuzzer's final stats (`-print_final_stats=1`), e.g. `stat::number_of_executed_units: 212345`.
    static func stat(_ name: String, in output: String) -> Int? {
        for line in output.split(separator: "\n") where line.hasPrefix("stat::\(name):") {
            return Int(line.dropFirst("stat::\(name):".count).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }
}

@Suite("Fuzzing the wire protocol", .enabled(if: FuzzRun.canRun, "needs scripts/fuzz.sh and swift to build the fuzz binary"))
struct FuzzTests {
    @Test("libFuzzer finds no crash in 20 s and runs enough inputs for that to mean something", .timeLimit(.minutes(5)))
    func fuzzWire() throws {
        try? FileManager.default.removeItem(atPath: FuzzRun.directory)
        var environment = ProcessInfo.processInfo.environment
        environment["FERRY_FUZZ_DIR"] = FuzzRun.directory
        let result = try Command.run(["bash", FuzzRun.script, "\(FuzzRun.seconds)"], environment: environment)
        let output = result.stdout + result.stderr
        #expect(result.status == 0, "scripts/fuzz.sh failed (\(result.status)); crash inputs in \(FuzzRun.directory)/artifacts:\n\(output.suffix(4000))")

        let artifacts = (try? FileManager.default.contentsOfDirectory(atPath: FuzzRun.directory + "/artifacts")) ?? []
        #expect(artifacts.isEmpty, "libFuzzer wrote \(artifacts) to \(FuzzRun.directory)/artifacts")

        // About 10,000 inputs a second on 2 cores; a tenth of that over the whole run still
        // covers every seed many times over, while a run that stalls or never starts does not.
        let executed = try #require(FuzzRun.stat("number_of_executed_units", in: output), "no final stats:\n\(output.suffix(4000))")
        #expect(executed > 20_000, "only \(executed) inputs ran in \(FuzzRun.seconds) s")
        let added = FuzzRun.stat("new_units_added", in: output) ?? 0
        #expect(added > 0, "the fuzzer found no new coverage: is the harness instrumented?")
    }
}
