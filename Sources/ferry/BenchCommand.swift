import ArgumentParser
import FerryBench
import FerryIO
import FerryVM
import Foundation

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Ferry and its peers (QEMU alone, ECMP, MPTCP) migrating the same guest in the lab, side by side.",
        discussion: """
            For each scenario: a lab, a guest that fills its memory, and every mode migrating it
            in turn, repeated; the medians and spreads go into a Markdown table (printed and
            written to OUT/bench.md), OUT/bench.json, and OUT/SCENARIO.svg (throughput per NIC
            over time for the Ferry modes). Scenarios: \(BenchScenario.catalog.map(\.name).joined(separator: ", ")).
            \(UpdateBench.scenarioName) (not in the default set, no lab, --modes ignored): \(UpdateBench.summary), timed with
            their downtime and CPU; OUT/\(UpdateBench.scenarioName).md and .json. \(DrainBench.scenarioName) (not in the
            default set, its own lab of three hosts, --modes ignored): \(DrainBench.summary); OUT/\(DrainBench.scenarioName).md and .json.
            \(LibvirtBench.scenarioName) and \(LibvirtBench.diskScenarioName) (not in the default set, a lab with a libvirtd per host,
            --modes ignored): \(LibvirtBench.summary), the second copying a disk with 1 GiB of data too; OUT/NAME.md and .json.
            """)

    @Option(name: .customLong("scenario"), help: "A scenario to run (repeatable) (default: \(BenchScenario.defaults.joined(separator: ", "))).")
    var scenarios: [String] = []

    @Option(help: "Runs per mode (default: 3).")
    var repeats = 3

    @Option(help: "Modes to run, comma-separated: \(BenchMode.allCases.map(\.rawValue).joined(separator: ", ")) (default: the scenario's own for the -hot scenarios, else all but ferry-lz4, ferry-zstd and those four).")
    var modes: String?

    @Option(help: "Where to write bench.md, bench.json and the SVGs (default: ./bench-out).")
    var out = "bench-out"

    @Flag(help: "Print the results as JSON instead of the table.")
    var json = false

    func validate() throws {
        for name in scenarios where !BenchScenario.catalog.contains(where: { $0.name == name }) && !Self.ownScenarios.contains(name) {
            throw ValidationError("unknown scenario '\(name)'; known: \(BenchScenario.catalog.map(\.name).joined(separator: ", "))")
        }
        guard (1...20).contains(repeats) else { throw ValidationError("--repeats must be between 1 and 20") }
        if let modes { _ = try parseModes(modes) }
    }

    /// Scenarios outside the lab table, each with its own lab (or none) and table.
    static let ownScenarios = [UpdateBench.scenarioName, DrainBench.scenarioName, LibvirtBench.scenarioName, LibvirtBench.diskScenarioName]

    func parseModes(_ text: String) throws -> [BenchMode] {
        try text.split(separator: ",").map { name in
            guard let mode = BenchMode(rawValue: String(name)) else {
                throw ValidationError("unknown mode '\(name)'; known: \(BenchMode.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return mode
        }
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        guard getuid() == 0 else { throw UserError("ferry bench needs root (it builds a lab of network namespaces)") }
        // Only the result goes to stdout (the table, or with --json the JSON, so that it
        // parses): the guest build's notes, the lab's commands and anything they print go
        // to stderr while the bench runs.
        let (text, failed) = try withStandardOutputOnStandardError { try measure() }
        print(text)
        if failed { throw ExitCode(1) }
    }

    /// Runs the bench and writes its files; returns what to print and whether a run failed.
    func measure() throws -> (text: String, failed: Bool) {
        let chosen = (scenarios.isEmpty ? BenchScenario.defaults : scenarios).compactMap { name in BenchScenario.catalog.first { $0.name == name } }
        let chosenModes = try modes.map(parseModes)
        let image = GuestImage()
        try image.build()
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        var results: [BenchResult] = []
        let clock = ContinuousClock.now
        var printed: [String] = []
        var failed = false
        if scenarios.contains(UpdateBench.scenarioName) {
            let (text, updateFailed) = try runUpdateBench(image)
            printed.append(text)
            failed = updateFailed
        }
        if scenarios.contains(DrainBench.scenarioName) {
            let (text, drainFailed) = try runOwnScenario(DrainBench.scenarioName, DrainBench.summary,
                                                         run: { try DrainBench(repeats: repeats, binary: SelfPath.executable, guest: image, log: $0).run() },
                                                         markdown: \.markdown, failed: { $0.runs.contains { !$0.succeeded } })
            printed.append(text)
            failed = failed || drainFailed
        }
        for (name, disk) in [(LibvirtBench.scenarioName, 0), (LibvirtBench.diskScenarioName, 1024)] where scenarios.contains(name) {
            let (text, libvirtFailed) = try runOwnScenario(name, LibvirtBench.summary,
                                                           run: { try LibvirtBench(diskMiB: disk, repeats: repeats, binary: SelfPath.executable, guest: image, log: $0).run() },
                                                           markdown: \.markdown, failed: { $0.runs.contains { !$0.succeeded } })
            printed.append(text)
            failed = failed || libvirtFailed
        }
        if !scenarios.isEmpty && scenarios.allSatisfy({ Self.ownScenarios.contains($0) }) {
            if json && printed.count > 1 { return ("[\n" + printed.joined(separator: ",\n") + "\n]", failed) }
            return (printed.joined(separator: "\n\n"), failed)
        }
        for scenario in chosen {
            FileHandle.standardError.write(Data("== \(scenario.name): \(scenario.summary)\n".utf8))
            let runner = BenchRunner(scenario: scenario, modes: chosenModes ?? scenario.modes ?? BenchMode.defaults, repeats: repeats, binary: SelfPath.executable, guest: image) { line in
                FileHandle.standardError.write(Data("\(line)\n".utf8))
            }
            let result = try runner.run()
            results.append(result)
            try result.svg.write(toFile: out + "/\(scenario.name).svg", atomically: true, encoding: .utf8)
        }
        let markdown = results.map(\.markdown).joined(separator: "\n\n")
        try markdown.write(toFile: out + "/bench.md", atomically: true, encoding: .utf8)
        let jsonText = try Self.json(results)
        try jsonText.write(toFile: out + "/bench.json", atomically: true, encoding: .utf8)
        FileHandle.standardError.write(Data(String(format: "bench: %.0f s; results in %@/\n", (ContinuousClock.now - clock).seconds, out).utf8))
        if results.contains(where: { $0.runs.contains { !$0.succeeded } }) { failed = true }
        if json {
            // One JSON document on stdout: the update bench's (if run) and the lab's as one array.
            return (printed.isEmpty ? jsonText : "[\n" + (printed + [jsonText]).joined(separator: ",\n") + "\n]", failed)
        }
        return ((printed + [markdown]).joined(separator: "\n\n"), failed)
    }

    /// Results as `ferry bench --json` prints and bench.json holds them.
    static func json<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    /// The same-host update scenario (`UpdateBench`): its own table and JSON. Returns what
    /// to print (the table, or the JSON with --json) and whether a run failed.
    func runUpdateBench(_ image: GuestImage) throws -> (text: String, failed: Bool) {
        try runOwnScenario(UpdateBench.scenarioName, UpdateBench.summary,
                           run: { try UpdateBench(repeats: repeats, binary: SelfPath.executable, guest: image, log: $0).run() },
                           markdown: \.markdown, failed: { $0.runs.contains { !$0.succeeded || !$0.guestOK } })
    }

    /// A scenario outside the lab table (update, drain): runs it with its lines on stderr,
    /// writes OUT/NAME.md and OUT/NAME.json; returns what to print and whether a run failed.
    func runOwnScenario<R: Encodable>(_ name: String, _ summary: String, run: (@escaping @Sendable (String) -> Void) throws -> R,
                                      markdown: (R) -> String, failed: (R) -> Bool) throws -> (text: String, failed: Bool) {
        FileHandle.standardError.write(Data("== \(name): \(summary)\n".utf8))
        let result = try run { line in FileHandle.standardError.write(Data("\(line)\n".utf8)) }
        try markdown(result).write(toFile: out + "/\(name).md", atomically: true, encoding: .utf8)
        let jsonText = try Self.json(result)
        try jsonText.write(toFile: out + "/\(name).json", atomically: true, encoding: .utf8)
        return (json ? jsonText : markdown(result), failed(result))
    }
}
