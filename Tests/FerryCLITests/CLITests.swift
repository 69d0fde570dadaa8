import ArgumentParser
import Foundation
import FerryWire
import Testing
@testable import ferry

@Suite("Command line")
struct CLITests {
    @Test("sizes", arguments: [("2G", 2048), ("512M", 512), ("512", 512), ("1.5GiB", 1536), ("1T", 1_048_576)])
    func sizes(text: String, mib: Int) {
        #expect(MemorySize(argument: text)?.mebibytes == mib)
    }

    @Test("bad sizes", arguments: ["", "0", "-1G", "lots", "0.1M", "1X"])
    func badSizes(text: String) {
        #expect(MemorySize(argument: text) == nil)
    }

    @Test("rates: tc-style bits or bytes")
    func rates() {
        #expect(Rate(argument: "1gbit")?.bytesPerSecond == 125_000_000)
        #expect(Rate(argument: "500mbit")?.bytesPerSecond == 62_500_000)
        #expect(Rate(argument: "100MB")?.bytesPerSecond == 100_000_000)
        #expect(Rate(argument: "1GiB/s")?.bytesPerSecond == 1 << 30)
        #expect(Rate(argument: "fast") == nil)
        #expect(Rate(argument: "0mbit") == nil)
    }

    @Test("durations")
    func durations() {
        #expect(DurationArgument(argument: "300ms")?.duration == .milliseconds(300))
        #expect(DurationArgument(argument: "2m")?.duration == .seconds(120))
        #expect(DurationArgument(argument: "5")?.duration == .seconds(5))
        #expect(DurationArgument(argument: "-5s") == nil)
    }

    @Test("endpoints", arguments: [("10.0.0.2", "10.0.0.2", 7470), ("host-b:9000", "host-b", 9000), ("[fd00::2]:81", "fd00::2", 81),
                                   ("[fd00::2]", "fd00::2", 7470)])
    func endpoints(text: String, host: String, port: Int) {
        let e = Endpoint(argument: text)
        #expect(e?.host == host && e?.port == UInt16(port))
    }

    @Test("--to this host means a same-host update", arguments: [("localhost", true), ("LOCALHOST:7470", true), ("127.0.0.1", true),
                                                                  ("127.1.2.3:9", true), ("::1", true), ("[::1]:7470", true),
                                                                  ("10.0.0.2", false), ("host-b", false), ("127.0.0.1.example", false),
                                                                  ("[fd00::1]", false)])
    func thisHost(text: String, local: Bool) throws {
        let e = try #require(Endpoint(argument: text))
        #expect(e.isThisHost == local)
    }

    @Test("bad endpoints", arguments: ["", "host:0", "host:99999", "a b", "[::1", "h:1:2x", "host;rm"])
    func badEndpoints(text: String) {
        #expect(Endpoint(argument: text) == nil)
    }

    @Test("bad arguments are usage errors with a message", arguments: [
        ["migrate", "vm1"],
        ["migrate", "vm1", "--to", "host:0"],
        ["migrate", "../x", "--to", "b"],
        ["migrate", "vm1", "--to", "b", "--multifd", "99"],
        ["migrate", "vm1", "--to", "b", "--bandwidth", "fast"],
        ["vm", "run", "x", "--kernel", "/nonexistent"],
        ["vm", "update", "vm1", "--qemu", "/nonexistent/qemu"],
        ["vm", "update", "../x"],
        ["vm", "run", "x", "--kernel", "/etc/hostname", "--memory", "0"],
        ["vm", "run", "bad name", "--kernel", "/etc/hostname"],
        ["lab", "up", "--nics", "0"],
        ["lab", "up", "--rate", "fast"],
        ["lab", "nic", "sideways", "a", "1"],
        ["nonsense"],
        ["migrate", "vm1", "--to", "b", "--insecure", "--key-file", "/etc/ferry/cluster.key"],
        ["serve", "--insecure", "--key-file", "/k"],
        ["serve", "--listen", "10.0.0.1:7000", "--listen", "10.0.1.1:7001"],
    ])
    func badArguments(args: [String]) {
        do {
            _ = try Ferry.parseAsRoot(args)
            Issue.record("\(args) must not parse")
        } catch {
            let message = Ferry.message(for: error)
            #expect(!message.isEmpty)
            #expect(Ferry.exitCode(for: error) == .validationFailure, "\(args): \(message)")
        }
    }

    @Test("help states every option's default")
    func help() {
        let migrate = Ferry.helpMessage(for: Migrate.self)
        for text in ["--to", "--multifd", "default: auto", "--channels-per-nic", "default: 4", "--bandwidth", "--downtime", "default: 300ms", "--json"] {
            #expect(migrate.contains(text), "migrate help lacks \(text)")
        }
        let run = Ferry.helpMessage(for: VM.Run.self)
        for text in ["--memory", "default: 512M", "--accel", "default: auto", "--kernel", "--initrd", "--append"] {
            #expect(run.contains(text), "vm run help lacks \(text)")
        }
        let root = Ferry.helpMessage()
        let serve = Ferry.helpMessage(for: Serve.self)
        for text in ["--listen", "--key-file", "--insecure", "FERRY_KEY_FILE"] {
            #expect(serve.contains(text), "serve help lacks \(text)")
        }
        for command in ["serve", "vm", "migrate", "status", "keygen", "guest", "lab", "demo"] {
            #expect(root.contains(command))
        }
    }

    @Test("keygen writes a private key file, refuses to overwrite it, and rotates with --add")
    func keygen() throws {
        let directory = NSTemporaryDirectory() + "ferry-keygen-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/keys/cluster.key"
        var first = try Ferry.parseAsRoot(["keygen", "--output", path])
        try first.run()
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
        let one = try KeyRing.load(path: path)
        #expect(one.keys.count == 1)

        var again = try Ferry.parseAsRoot(["keygen", "--output", path])
        #expect(throws: (any Error).self) { try again.run() }
        #expect(try KeyRing.load(path: path) == one, "a refused keygen must not touch the file")

        var rotate = try Ferry.parseAsRoot(["keygen", "--output", path, "--add"])
        try rotate.run()
        let two = try KeyRing.load(path: path)
        #expect(two.keys.count == 2)
        #expect(two.primary == one.primary, "the old key stays in use until the operator moves the new one first")
        #expect(two.keys[1] != one.primary)
    }

    @Test("serve and migrate refuse to run without a cluster key, and say how to make one", arguments: [
        ["serve", "--listen", "127.0.0.1:7999", "--key-file", "/nonexistent/cluster.key"],
        ["migrate", "vm1", "--to", "192.0.2.1", "--key-file", "/nonexistent/cluster.key"],
    ])
    func noKey(args: [String]) throws {
        var command = try Ferry.parseAsRoot(args)
        do {
            try command.run()
            Issue.record("\(args[0]) ran without a key")
        } catch {
            let message = "\(error)"
            #expect(message.contains("/nonexistent/cluster.key") && message.contains("ferry keygen") && message.contains("--insecure"), "\(message)")
        }
    }
}
