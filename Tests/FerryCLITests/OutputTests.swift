import Foundation
import Testing

/// The real `ferry` binary, run as a user would, for what only a process shows: which
/// stream a line goes to and the exit status. Needs the binary built (`swift build`).
@Suite("Command line: stdout, stderr and exit status of the real binary",
       .enabled(if: FileManager.default.isExecutableFile(atPath: BinaryRun.ferry), "needs the built ferry binary"))
struct OutputTests {
    @Test("guest build: the build's notes go to stderr, stdout holds only the two paths (as bench --json holds only its JSON)")
    func guestBuildStdout() throws {
        let directory = NSTemporaryDirectory() + "ferry-out-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // A stand-in for guest/build.sh that says what the real one says when cached.
        try FileManager.default.createDirectory(atPath: directory + "/src", withIntermediateDirectories: true)
        try "echo \"guest: up to date ($1)\"\n".write(toFile: directory + "/src/build.sh", atomically: true, encoding: .utf8)
        let run = try BinaryRun(["guest", "build", "--out", directory + "/out"], environment: ["FERRY_GUEST_SRC": directory + "/src"])
        #expect(run.status == 0, "\(run.stderr)")
        #expect(run.stdout == "kernel: \(directory)/out/vmlinuz\ninitrd: \(directory)/out/initrd.img\n", "stdout: \(run.stdout)")
        #expect(run.stderr.contains("guest: up to date"), "stderr: \(run.stderr)")
    }

    @Test("a VM that is not on this host: a plain error and exit status 1, no update report", arguments: [
        ["vm", "update", "nosuch"],
        ["migrate", "nosuch", "--to", "127.0.0.1"],
        ["migrate", "nosuch", "--to", "localhost", "--json"],
    ])
    func noSuchVM(args: [String]) throws {
        let directory = NSTemporaryDirectory() + "ferry-out-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let run = try BinaryRun(args + ["--state-dir", directory])
        #expect(run.status == 1)
        #expect(run.stderr.contains("no VM named 'nosuch' on this host"), "stderr: \(run.stderr)")
        #expect(run.stdout.isEmpty, "stdout: \(run.stdout)")
    }
}

extension OutputTests {
    @Test("vm run refuses bad disks with a clear error and starts nothing", arguments: [
        (["--kernel", "/bin/sh", "--disk", "/nonexistent/vm.qcow2"], "does not exist"),
        (["--kernel", "/bin/sh", "--disk", "/bin/sh,format=qcow2"], "not in qcow2 format"),
        (["--kernel", "/bin/sh", "--disk", "/bin/sh,format=vmdk"], "--disk"),
        (["--boot", "disk"], "--boot disk boots from the first --disk"),
        (["--boot", "disk", "--disk", "/bin/sh", "--kernel", "/bin/sh"], "do not apply"),
        ([String](), "--kernel is needed"),
    ])
    func badDisks(args: [String], message: String) throws {
        let directory = NSTemporaryDirectory() + "ferry-out-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let run = try BinaryRun(["vm", "run", "vm1"] + args + ["--state-dir", directory])
        #expect(run.status != 0)
        #expect(run.stderr.contains(message), "stderr: \(run.stderr)")
        #expect(!FileManager.default.fileExists(atPath: directory + "/vms/vm1/state.json"))
    }
}

/// One run of the ferry binary: its exit status, stdout and stderr.
struct BinaryRun {
    static var ferry: String {
        if let bin = ProcessInfo.processInfo.environment["FERRY_BIN"] { return bin }
        // <repo>/Tests/FerryCLITests/OutputTests.swift -> <repo>/.build/debug/ferry
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return repo.appendingPathComponent(".build/debug/ferry").path
    }

    let status: Int32
    let stdout: String
    let stderr: String

    init(_ args: [String], environment: [String: String] = [:]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.ferry)
        process.arguments = args
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        // stdout through a pipe, stderr to a file: reading one pipe to its end cannot
        // then block on the other filling up.
        let errPath = NSTemporaryDirectory() + "ferry-stderr-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: errPath) }
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle(forWritingAtPath: errPath)
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        status = process.terminationStatus
        stdout = String(decoding: outData, as: UTF8.self)
        stderr = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
    }
}
