import Foundation
import Testing

/// scripts/install.sh into a temporary root, and packaging/ferry.service checked there by
/// `systemd-analyze verify` (no systemd runs here: verify loads the unit offline, with
/// `--root`; it needs the units ferry.service depends on, copied from this machine, and the
/// binary ExecStart names, which the install puts there).
@Suite("Service: install.sh and the systemd unit",
       .enabled(if: FileManager.default.isExecutableFile(atPath: BinaryRun.ferry), "needs the built ferry binary"))
struct ServiceUnitTests {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    static let analyze = "/usr/bin/systemd-analyze"
    static let hostUnits = "/usr/lib/systemd/system"

    private func run(_ argv: [String], environment: [String: String] = [:]) throws -> (status: Int32, stdout: String, stderr: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: argv[0])
        process.arguments = Array(argv.dropFirst())
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let errPath = NSTemporaryDirectory() + "ferry-svc-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: errPath) }
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle(forWritingAtPath: errPath)
        try process.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self), (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
    }

    @Test("install.sh with DESTDIR: binary, unit, example config (kept when there is one), state directory")
    func install() throws {
        let root = NSTemporaryDirectory() + "ferry-root-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: root) }
        let first = try run([Self.repo + "/scripts/install.sh", BinaryRun.ferry], environment: ["DESTDIR": root])
        #expect(first.status == 0, "\(first.stderr)")
        let fm = FileManager.default
        #expect(fm.isExecutableFile(atPath: root + "/usr/local/bin/ferry"))
        #expect(fm.fileExists(atPath: root + "/etc/systemd/system/ferry.service"))
        #expect(fm.fileExists(atPath: root + "/var/lib/ferry"))
        #expect(fm.contents(atPath: root + "/etc/ferry/ferry.conf") == fm.contents(atPath: Self.repo + "/packaging/ferry.conf.example"))
        let check = try BinaryRun(["config", "check", root + "/etc/ferry/ferry.conf"])
        #expect(check.status == 0 && check.stdout.hasPrefix("ok"), "\(check.stdout)")

        try "max-migrations = 4\n".write(toFile: root + "/etc/ferry/ferry.conf", atomically: true, encoding: .utf8)
        let again = try run([Self.repo + "/scripts/install.sh", BinaryRun.ferry], environment: ["DESTDIR": root])
        #expect(again.status == 0 && again.stderr.contains("keeping"), "\(again.stderr)")
        #expect(try String(contentsOfFile: root + "/etc/ferry/ferry.conf", encoding: .utf8) == "max-migrations = 4\n")
    }

    @Test("systemd-analyze verify: the installed unit loads with no warning",
          .enabled(if: FileManager.default.isExecutableFile(atPath: analyze) && FileManager.default.fileExists(atPath: hostUnits + "/sysinit.target"),
                   "needs systemd-analyze and systemd's units (/usr/lib/systemd/system)"))
    func verify() throws {
        let root = NSTemporaryDirectory() + "ferry-root-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: root) }
        let installed = try run([Self.repo + "/scripts/install.sh", BinaryRun.ferry], environment: ["DESTDIR": root])
        try #require(installed.status == 0, "\(installed.stderr)")
        // The units the service's dependencies name (sysinit.target, network-online.target...).
        try FileManager.default.createDirectory(atPath: root + "/usr/lib/systemd", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: Self.hostUnits, toPath: root + "/usr/lib/systemd/system")
        let verify = try run([Self.analyze, "verify", "--man=no", "--root=" + root, "/etc/systemd/system/ferry.service"])
        // Unknown keys and bad values are warnings on stderr with exit status 0: none allowed.
        #expect(verify.status == 0 && verify.stderr.isEmpty, "\(verify.stderr)")

        // And it does catch them (else the check above proves nothing).
        let unit = root + "/etc/systemd/system/ferry.service"
        let text = try String(contentsOfFile: unit, encoding: .utf8)
        try text.replacingOccurrences(of: "KillMode=process", with: "KillMode=procss").write(toFile: unit, atomically: true, encoding: .utf8)
        let broken = try run([Self.analyze, "verify", "--man=no", "--root=" + root, "/etc/systemd/system/ferry.service"])
        #expect(broken.stderr.contains("kill mode"), "\(broken.stderr)")
    }

    @Test("the unit spares the VMs: KillMode=process, OOMPolicy=continue, no memory or CPU limit; KVM and tun allowed")
    func unitSettings() throws {
        let text = try String(contentsOfFile: Self.repo + "/packaging/ferry.service", encoding: .utf8)
        let lines = Set(text.split(separator: "\n").map(String.init).filter { !$0.hasPrefix("#") })
        for line in ["KillMode=process", "OOMPolicy=continue", "ExecStart=/usr/local/bin/ferry serve", "DeviceAllow=/dev/kvm rw",
                     "DeviceAllow=/dev/net/tun rw", "CapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_RESOURCE", "StateDirectory=ferry"] {
            #expect(lines.contains(line), "\(line)")
        }
        for key in ["MemoryMax=", "MemoryHigh=", "CPUQuota=", "PrivateDevices=", "MemoryDenyWriteExecute=", "PrivateNetwork="] {
            #expect(!lines.contains { $0.hasPrefix(key) }, "\(key) would break the VMs")
        }
    }
}
