import ArgumentParser
import FerryConfig
import Foundation
import Logging
import Testing
@testable import ferry

/// The configuration file through the real binary: which settings win, what `config show`
/// and `config check` print, and that a bad file stops the commands that read host settings.
@Suite("Command line: the host configuration file",
       .enabled(if: FileManager.default.isExecutableFile(atPath: BinaryRun.ferry), "needs the built ferry binary"))
struct ConfigFileTests {
    /// A temporary directory with `ferry.conf` holding `text`.
    private func withFile(_ text: String, _ body: (_ directory: String, _ file: String) throws -> Void) throws {
        let directory = NSTemporaryDirectory() + "ferry-conf-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let file = directory + "/ferry.conf"
        try text.write(toFile: file, atomically: true, encoding: .utf8)
        try body(directory, file)
    }

    @Test("config check: ok, or every error with file, line, column and key, exit status 1")
    func check() throws {
        try withFile("max-bandwidth = \"2gbit\"\nnics = [\"eth1\"]\n") { _, file in
            let run = try BinaryRun(["config", "check", file])
            #expect(run.status == 0 && run.stdout == "ok: \(file), 2 settings\n", "\(run.stdout) \(run.stderr)")
        }
        try withFile("max-migration = 4\nmax-bandwidth = \"fast\"\nlisten = [\"10.0.0.1:1\", \"10.0.0.2:2\"]\nlog-level = \"loud\"\nmetrics = \"a:b\"\n") { _, file in
            let run = try BinaryRun(["config", "check", file])
            #expect(run.status == 1)
            #expect(run.stdout == """
                \(file):1:1: max-migration: unknown key (did you mean 'max-migrations'?)
                \(file):2:17: max-bandwidth: 'fast' is not a rate (e.g. 2gbit, 500mbit, 100MB)
                \(file):3:10: listen: every address must use the same port (data channels are told one port)
                \(file):4:13: log-level: 'loud' is not a log level (trace, debug, info, notice, warning, error, critical)
                \(file):5:11: metrics: 'a:b' is not PORT or HOST:PORT

                """, "\(run.stdout)")
        }
        let missing = try BinaryRun(["config", "check", "/nonexistent/ferry.conf"])
        #expect(missing.status == 1 && missing.stdout == "/nonexistent/ferry.conf: no such file\n")
    }

    @Test("a bad file stops every command that reads host settings, naming file, line and key; help and config check still work")
    func badFileStops() throws {
        try withFile("\nstate-dir = \"relative\"\n") { directory, file in
            let list = try BinaryRun(["vm", "list", "--state-dir", directory], environment: ["FERRY_CONFIG": file])
            #expect(list.status != 0)
            #expect(list.stderr.contains("\(file):2:13: state-dir: 'relative' is not an absolute path"), "\(list.stderr)")
            let flag = try BinaryRun(["vm", "list", "--config", file, "--state-dir", directory])
            #expect(flag.status != 0 && flag.stderr.contains("\(file):2:13"), "\(flag.stderr)")
            let help = try BinaryRun(["--help"], environment: ["FERRY_CONFIG": file])
            #expect(help.status == 0 && help.stdout.contains("config"))
            let serveHelp = try BinaryRun(["serve", "--help"], environment: ["FERRY_CONFIG": file])
            #expect(serveHelp.status == 0 && serveHelp.stdout.contains("--config"))
            let check = try BinaryRun(["config", "check"], environment: ["FERRY_CONFIG": file])
            #expect(check.status == 1 && check.stdout.contains("\(file):2:13"))
        }
        let named = try BinaryRun(["vm", "list", "--config", "/nonexistent/ferry.conf"])
        #expect(named.status != 0 && named.stderr.contains("/nonexistent/ferry.conf: no such file"), "\(named.stderr)")
    }

    @Test("precedence: flag, then environment, then file (state-dir as ferry status reports it)")
    func precedence() throws {
        try withFile("") { directory, file in
            try "state-dir = \"\(directory)/file\"\n".write(toFile: file, atomically: true, encoding: .utf8)
            func stateDir(_ args: [String], _ environment: [String: String]) throws -> String? {
                let run = try BinaryRun(["status", "--config", file] + args, environment: environment)
                return run.stdout.split(separator: "\n").first { $0.hasPrefix("host:") }?
                    .split(separator: ",").first { $0.contains("state:") }?.split(separator: " ").last.map(String.init)
            }
            #expect(try stateDir([], [:]) == "\(directory)/file")
            #expect(try stateDir([], ["FERRY_STATE_DIR": "\(directory)/env"]) == "\(directory)/env")
            #expect(try stateDir(["--state-dir", "\(directory)/flag"], ["FERRY_STATE_DIR": "\(directory)/env"]) == "\(directory)/flag")
        }
    }

    @Test("config show: every key, its value and where it comes from; --json")
    func show() throws {
        try withFile("# host b\nmax-bandwidth = \"2gbit\"\n\n[nic-speeds]\neth1 = \"10gbit\"\n") { _, file in
            let run = try BinaryRun(["config", "show", "--config", file], environment: ["FERRY_DISK_DIR": "/srv/disks"])
            #expect(run.status == 0, "\(run.stderr)")
            let lines = run.stdout.split(separator: "\n").map(String.init)
            #expect(lines.first == "file: \(file)")
            func line(_ key: String) -> String? { lines.first { $0.hasPrefix(key + " ") } }
            #expect(line("max-bandwidth")?.hasSuffix("2gbit" + String(repeating: " ", count: 27) + " \(file):2") == true, "\(run.stdout)")
            #expect(line("nic-speeds")?.contains("eth1=10gbit") == true && line("nic-speeds")?.hasSuffix("\(file):4") == true)
            #expect(line("disk-dir")?.hasSuffix("environment FERRY_DISK_DIR") == true)
            #expect(line("max-outgoing-migrations")?.hasSuffix("default") == true || ProcessInfo.processInfo.environment["FERRY_MAX_OUTGOING_MIGRATIONS"] != nil)
            #expect(lines.count == 1 + ConfigKey.all.count)

            let json = try BinaryRun(["config", "show", "--json"], environment: ["FERRY_CONFIG": file, "FERRY_DISK_DIR": "/srv/disks"])
            let object = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
            #expect(object["file"] as? String == file && object["fileExists"] as? Bool == true)
            let settings = try #require(object["settings"] as? [[String: Any]])
            let bandwidth = try #require(settings.first { $0["key"] as? String == "max-bandwidth" })
            #expect(bandwidth["source"] as? String == "file" && bandwidth["line"] as? Int == 2 && bandwidth["value"] as? String == "2gbit")
            #expect(bandwidth["variable"] as? String == "FERRY_MAX_BANDWIDTH")
            let disks = try #require(settings.first { $0["key"] as? String == "disk-dir" })
            #expect(disks["source"] as? String == "environment" && disks["value"] as? String == "/srv/disks")
        }
    }

    @Test("a Ferry process started by another reads its own file, not its parent's settings as environment")
    func childReadsItsOwnFile() throws {
        try withFile("max-outgoing-migrations = 5\n") { _, file in
            func source(_ environment: [String: String]) throws -> String? {
                let run = try BinaryRun(["config", "show", "--config", file], environment: environment)
                return run.stdout.split(separator: "\n").first { $0.hasPrefix("max-bandwidth ") }.map(String.init)
            }
            // The parent's file set max-bandwidth; this file does not: the default.
            let parent = ["FERRY_MAX_BANDWIDTH": "2gbit", "FERRY_CONFIG_APPLIED": "FERRY_MAX_BANDWIDTH=2gbit"]
            let fromParent = try source(parent)
            #expect(fromParent?.hasSuffix(" default") == true, "\(fromParent ?? "")")
            // Set again to another value (by hand, or by the parent for the child): the environment's.
            let changed = try source(["FERRY_MAX_BANDWIDTH": "3gbit", "FERRY_CONFIG_APPLIED": "FERRY_MAX_BANDWIDTH=2gbit"])
            #expect(changed?.hasSuffix("environment FERRY_MAX_BANDWIDTH") == true, "\(changed ?? "")")
        }
    }

    @Test("serve reads its variables (set by the file or the environment), and names a bad one")
    func serveVariables() throws {
        try withFile("") { directory, _ in
            let run = try BinaryRun(["serve", "--insecure", "--state-dir", directory], environment: ["FERRY_LISTEN": "127.0.0.1:1,127.0.0.1:2"])
            #expect(run.status != 0 && run.stderr.contains("FERRY_LISTEN=127.0.0.1:1,127.0.0.1:2: every address must use the same port"), "\(run.stderr)")
            let max = try BinaryRun(["serve", "--insecure", "--state-dir", directory], environment: ["FERRY_MAX_MIGRATIONS": "100"])
            #expect(max.status != 0 && max.stderr.contains("FERRY_MAX_MIGRATIONS=100 is not valid"), "\(max.stderr)")
            let level = try BinaryRun(["vm", "list", "--state-dir", directory], environment: ["FERRY_LOG_LEVEL": "loud"])
            #expect(level.status != 0 && level.stderr.contains("FERRY_LOG_LEVEL=loud is not valid"), "\(level.stderr)")
        }
    }
}

@Suite("Command line: serve's settings and journald's log lines")
struct ServiceSettingsTests {
    @Test("serve: the flag wins; --max-migrations stays 'not given' until the variable or the default")
    func serveFlags() throws {
        let given = try #require(try Ferry.parseAsRoot(["serve", "--max-migrations", "5", "--listen", "10.0.0.1:7000", "--max-bandwidth", "1gbit", "--disk-dir", "/d"]) as? Serve)
        let settings = try given.settings()
        #expect(settings.maxMigrations == 5 && settings.listen == [Endpoint(host: "10.0.0.1", port: 7000)])
        #expect(settings.maxBandwidth == Rate(argument: "1gbit") && settings.diskDirectory == "/d")
        let plain = try #require(try Ferry.parseAsRoot(["serve"]) as? Serve)
        #expect(plain.maxMigrations == nil)
    }

    @Test("environment values parse with the flags' parsers")
    func environmentParsers() throws {
        #expect(try EnvironmentSettings.listen("10.0.0.1, [fd00::1]:7470") == [Endpoint(host: "10.0.0.1", port: 7470), Endpoint(host: "fd00::1", port: 7470)])
        #expect(throws: EnvironmentSettings.Invalid.self) { try EnvironmentSettings.listen("a b") }
    }

    @Test("journald: each line starts with its priority, no timestamp, metadata sorted at the end")
    func journalFormat() {
        #expect(JournalLogHandler.format(level: .warning, label: "ferry.serve", message: "channel failed", metadata: ["nic": "eth1", "bytes": "5"])
                == "<4>ferry.serve: channel failed bytes=5 nic=eth1\n")
        #expect(JournalLogHandler.format(level: .info, label: "l", message: "two\nlines", metadata: [:]) == "<6>l: two\n<6>  lines\n")
        let priorities = Logger.Level.allCases.map(JournalLogHandler.priority)
        #expect(priorities == [7, 7, 6, 5, 4, 3, 2])
    }

    @Test("journald is stderr only when JOURNAL_STREAM names stderr's device and inode")
    func journalStream() throws {
        let path = NSTemporaryDirectory() + "ferry-journal-\(UUID().uuidString.prefix(8))"
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let fd = open(path, O_WRONLY)
        defer { close(fd) }
        var info = stat()
        #expect(fstat(fd, &info) == 0)
        #expect(JournalLogHandler.isJournal(environment: "\(info.st_dev):\(info.st_ino)", descriptor: fd))
        #expect(!JournalLogHandler.isJournal(environment: "\(info.st_dev):\(info.st_ino + 1)", descriptor: fd))
        #expect(!JournalLogHandler.isJournal(environment: nil, descriptor: fd))
        #expect(!JournalLogHandler.isJournal(environment: "garbage", descriptor: fd))
    }
}
