import FerryIO
import FerryVM
import Foundation

/// Running Ferry on a lab host: commands, the daemon, the host's VMs.
public struct LabHost: Sendable {
    public let lab: Lab
    public let host: String
    /// The ferry binary to run inside the namespace.
    public let binary: String

    public init(lab: Lab, host: String, binary: String) {
        self.lab = lab
        self.host = host
        self.binary = binary
    }

    public var store: VMStore { VMStore(paths: StatePaths(root: lab.stateDirectory(host))) }

    /// Runs `ferry ARGS` on this host and collects its output.
    @discardableResult
    public func ferry(_ args: [String]) throws -> CommandResult {
        try Command.run(try lab.execArguments(host, [binary] + args))
    }

    /// Runs `ferry ARGS` on this host with this process's terminal (progress shows live).
    public func ferryInteractive(_ args: [String]) throws -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = try lab.execArguments(host, [binary] + args)
        try process.run()
        process.waitUntilExit()
        return process.terminationStatus
    }

    public var serveLog: String { lab.stateDirectory(host) + "/serve.log" }

    /// Starts `ferry serve` in the background on this host; returns its pid once it listens.
    /// `prelude`: shell commands run first in the daemon's own mount namespace (which
    /// `ip netns exec` makes private): what it sees of the filesystem may differ from the
    /// other host's, as a host's own disks would.
    public func startServe(port: UInt16 = 7470, extra: [String] = [], prelude: String? = nil) throws -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        let serve = [binary, "serve", "--listen", "0.0.0.0:\(port)"] + extra
        if let prelude {
            let quoted = serve.map { "'" + $0.replacingOccurrences(of: "'", with: "'\\''") + "'" }.joined(separator: " ")
            process.arguments = try lab.execArguments(host, ["bash", "-c", prelude + " && exec " + quoted])
        } else {
            process.arguments = try lab.execArguments(host, serve)
        }
        _ = FileManager.default.createFile(atPath: serveLog, contents: nil)
        let log = FileHandle(forWritingAtPath: serveLog)!
        // Only what this daemon writes counts (another may already have said it listens).
        let start = Int(log.seekToEndOfFile())
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let pid = process.processIdentifier
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            if let data = FileManager.default.contents(atPath: serveLog), data.count > start,
               String(decoding: data[start...], as: UTF8.self).contains("listening on") { return pid }
            if !process.isRunning { break }
            Thread.sleep(forTimeInterval: 0.05)
        }
        ProcessStats.terminate(pid: pid)
        let text = (try? String(contentsOfFile: serveLog, encoding: .utf8)) ?? ""
        throw Lab.LabError.setup("ferry serve did not start on \(host): \(text.suffix(500))")
    }
}

/// `ferry probe ADDRESS` in the lab's client namespace (the VM's users), from ``init`` to
/// ``stop()``: what they saw of the guest's network meanwhile.
public final class ClientProbe {
    let process: Process
    /// Where the probe writes its result, and its own output.
    public let json: String
    public let output: String

    public init(lab: Lab, binary: String, address: String) throws {
        json = lab.directory + "/probe-\(UUID().uuidString).json"
        output = json + ".txt"
        process = try Command.start("/usr/bin/env", try lab.execArguments(Lab.client, [binary, "probe", address, "--quiet", "--json", json]),
                                    log: output)
    }

    /// SIGTERM; the result it wrote, or an error with what it printed.
    public func stop() throws -> NetworkProbe.Result {
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        guard let data = FileManager.default.contents(atPath: json) else {
            let text = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
            throw Lab.LabError.setup("ferry probe wrote no result (exit \(process.terminationStatus)): \(text.suffix(500))")
        }
        return try JSONDecoder().decode(NetworkProbe.Result.self, from: data)
    }
}
