import FerryIO
import Foundation
import Testing
@testable import FerryQMP

/// QMP against a scripted peer on a real Unix socket (transcripts recorded from QEMU 7.2),
/// and against a real QEMU where one is installed.
@Suite("QMP client")
struct QMPClientTests {
    static let greeting = #"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#

    /// Serves one QMP client: sends the greeting in two pieces, then answers each request
    /// with `respond` (which may also emit events first).
    final class ScriptedPeer: Sendable {
        let path: String
        let listener: Socket
        let received = Locked<[String]>([])

        init(respond: @escaping @Sendable (JSONValue, Socket) -> Void) throws {
            path = FileManager.default.temporaryDirectory.appendingPathComponent("qmp-\(UUID().uuidString.prefix(8)).sock").path
            listener = try Socket.listenUnix(path: path)
            let listener = self.listener
            let received = self.received
            Thread {
                guard let conn = try? listener.accept(timeout: .seconds(5)) else { return }
                let g = Array((QMPClientTests.greeting + "\r\n").utf8)
                try? conn.writeAll(Array(g[0..<20]))
                Thread.sleep(forTimeInterval: 0.02)
                try? conn.writeAll(Array(g[20...]))
                var pending: [UInt8] = []
                var buf = [UInt8](repeating: 0, count: 4096)
                while let n = try? buf.withUnsafeMutableBytes({ try conn.read(into: $0) }), n > 0 {
                    pending += buf[0..<n]
                    while let nl = pending.firstIndex(of: 10) {
                        let line = Array(pending[..<nl])
                        pending.removeSubrange(...nl)
                        received.withLock { $0.append(String(decoding: line, as: UTF8.self)) }
                        if let v = try? JSONValue.parse(line) { respond(v, conn) }
                    }
                }
            }.start()
        }

        static func reply(_ conn: Socket, _ text: String) {
            try? conn.writeAll(Array((text + "\r\n").utf8))
        }
    }

    @Test("greeting, capabilities, a command and its reply")
    func commandReply() throws {
        let peer = try ScriptedPeer { req, conn in
            let id = req["id"]!.int!
            switch req["execute"]?.string {
            case "qmp_capabilities": ScriptedPeer.reply(conn, #"{"return": {}, "id": \#(id)}"#)
            case "query-status": ScriptedPeer.reply(conn, #"{"return": {"status": "running", "singlestep": false, "running": true}, "id": \#(id)}"#)
            default: ScriptedPeer.reply(conn, #"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": \#(id)}"#)
            }
        }
        let qmp = try QMPClient(path: peer.path)
        #expect(qmp.qemuVersion == "7.2.22")
        #expect(try qmp.queryStatus() == RunState(status: .running, running: true))
        #expect(peer.received.current.first?.contains("qmp_capabilities") == true)
        do {
            try qmp.execute("nope")
            Issue.record("an error reply must throw")
        } catch {
            #expect(error.kind == .command(errorClass: "CommandNotFound", description: "The command nope has not been found"))
            #expect(error.description.contains("nope"))
        }
    }

    @Test("events that arrive before a reply are queued, not mistaken for it")
    func eventsInterleaved() throws {
        let peer = try ScriptedPeer { req, conn in
            let id = req["id"]!.int!
            if req["execute"]?.string == "stop" {
                ScriptedPeer.reply(conn, #"{"timestamp": {"seconds": 1700000000, "microseconds": 250000}, "event": "STOP"}"#)
            }
            ScriptedPeer.reply(conn, #"{"return": {}, "id": \#(id)}"#)
        }
        let qmp = try QMPClient(path: peer.path)
        let seen = Locked<[String]>([])
        qmp.eventHandler = { e in seen.withLock { $0.append(e.name) } }
        try qmp.execute("stop")
        let event = try #require(qmp.nextEvent(named: ["STOP"], timeout: .seconds(2)))
        #expect(event.timestamp == 1_700_000_000.25)
        #expect(seen.current == ["STOP"])
    }

    @Test("no reply within the timeout is a timeout error")
    func timeout() throws {
        let peer = try ScriptedPeer { req, conn in
            if req["execute"]?.string == "qmp_capabilities" { ScriptedPeer.reply(conn, #"{"return": {}, "id": \#(req["id"]!.int!)}"#) }
        }
        let qmp = try QMPClient(path: peer.path)
        do {
            try qmp.execute("query-migrate", timeout: .milliseconds(200))
            Issue.record("must time out")
        } catch {
            #expect(error.kind == .timeout)
        }
    }

    @Test("a socket that is not QMP is refused with a clear error")
    func notQMP() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("notqmp-\(getpid()).sock").path
        let listener = try Socket.listenUnix(path: path)
        Thread {
            if let c = try? listener.accept(timeout: .seconds(5)) { try? c.writeAll(Array("{\"hello\": 1}\n".utf8)) }
        }.start()
        #expect(throws: QMPError.self) { try QMPClient(path: path, timeout: .seconds(2)) }
        #expect(throws: QMPError.self) { try QMPClient(path: "/nonexistent/qmp.sock") }
    }

    @Test("query-migrate is typed")
    func migrationInfo() throws {
        let v = try JSONValue.parse(Array(#"{"status": "active", "expected-downtime": 300, "ram": {"transferred": 1000, "remaining": 24, "total": 1024, "duplicate": 3, "normal": 2, "dirty-pages-rate": 10, "page-size": 4096, "mbps": 950.5, "dirty-sync-count": 2}}"#.utf8))
        let info = MigrationInfo(v)
        #expect(info.status == .active)
        #expect(info.transferredBytes == 1000 && info.remainingBytes == 24 && info.totalBytes == 1024)
        #expect(info.dirtyBytesPerSecond == 40960)
        #expect(info.expectedDowntimeMilliseconds == 300)
        #expect(!info.status.isFinished && info.status.isInProgress)
    }

    @Test("QEMU's migration and run states are typed; a state Ferry does not know counts as under way")
    func typedStates() {
        for name in ["none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
                     "postcopy-recover", "completed", "failed", "colo", "pre-switchover", "device", "wait-unplug"] {
            let status = MigrationStatus(qemuName: name)
            #expect(status.qemuName == name)
            if case .other = status { Issue.record("\(name) is one of QEMU 7.2's states") }
        }
        #expect(MigrationStatus(qemuName: "completed").hasEnded && MigrationStatus(qemuName: "none").hasEnded)
        #expect(!MigrationStatus(qemuName: "none").isFinished)
        #expect(MigrationStatus(qemuName: "pre-switchover").isInProgress && MigrationStatus(qemuName: "cancelling").isInProgress)
        let future = MigrationStatus(qemuName: "some-new-state")
        #expect(future == .other("some-new-state") && future.isInProgress && future.qemuName == "some-new-state")
        for name in ["running", "paused", "prelaunch", "inmigrate", "finish-migrate", "postmigrate", "shutdown",
                     "suspended", "guest-panicked", "internal-error", "io-error"] {
            #expect(QEMURunStatus(qemuName: name).qemuName == name)
        }
        #expect(QEMURunStatus(qemuName: "postmigrate").isPausedByMigration && !QEMURunStatus(qemuName: "paused").isPausedByMigration)
        #expect(QEMURunStatus(qemuName: "restore-vm") == .other("restore-vm"))
    }

    @Test("against a real QEMU: commands, an event, and QEMU exiting", .enabled(if: Command.exists("qemu-system-x86_64")))
    func realQEMU() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("qmp-real-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let sock = dir + "/qmp.sock"
        try Command.check(["qemu-system-x86_64", "-M", "none", "-display", "none", "-nodefaults",
                           "-qmp", "unix:\(sock),server=on,wait=off", "-daemonize", "-pidfile", dir + "/pid"])
        let pid = Int32(try String(contentsOfFile: dir + "/pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))!
        defer { ProcessStats.terminate(pid: pid) }
        let qmp = try QMPClient(path: sock)
        #expect(qmp.qemuVersion.hasPrefix("7.") || qmp.qemuVersion.split(separator: ".").count == 3)
        #expect(try qmp.queryMigrate().status == MigrationStatus.none)
        try qmp.execute("stop")
        #expect(qmp.nextEvent(named: ["STOP"], timeout: .seconds(5)) != nil)
        #expect(try qmp.queryStatus().running == false)
        // A descriptor passed with getfd (SCM_RIGHTS) is QEMU's under its name: closefd
        // finds it, and a second closefd no longer does.
        let (ours, theirs) = try Socket.pair(name: "getfd test")
        defer { ours.close(); theirs.close() }
        try qmp.execute("getfd", arguments: ["fdname": .string("ferry-test")], passing: theirs.fd)
        try qmp.execute("closefd", arguments: ["fdname": .string("ferry-test")])
        #expect(throws: QMPError.self) { try qmp.execute("closefd", arguments: ["fdname": .string("ferry-test")]) }
        do {
            try qmp.execute("migrate-set-parameters", arguments: ["downtime-limit": .number(-5)])
            Issue.record("QEMU must refuse a negative downtime")
        } catch {
            if case .command = error.kind {} else { Issue.record("expected a command error, got \(error)") }
        }
        try qmp.quit()
        #expect(ProcessStats.waitForExit(pid: pid, timeout: .seconds(5)))
        #expect(throws: QMPError.self) { try qmp.execute("query-status", timeout: .seconds(2)) }
    }
}
