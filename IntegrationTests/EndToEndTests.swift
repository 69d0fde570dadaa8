import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import FerryWire
import Foundation
import Testing

/// Two real QEMUs under TCG, the real `ferry` binary, the lab's namespaces.
@Suite("End to end: live migration in the lab", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest (scripts/test.sh)"))
struct EndToEndTests {
    @Test("the demo guest migrates while dirtying its memory, keeps running and verifying at b, and comes back")
    func demoGuestRoundTrip() throws {
        let lab = try TestLab(nics: 2)
        try lab.serve(on: "b")
        try lab.serve(on: "a")
        let source = try lab.startDemoVM("vm1", memory: 320, fill: 128, dirty: 8)
        let before = try #require(GuestConsole(path: source.paths.serialLog).lastHeartbeat)

        let watcher = HeartbeatWatcher(paths: [source.paths.serialLog])
        watcher.add(path: lab.b.store.vmPaths("vm1").serialLog)
        // The product's default (--multifd auto: one QEMU stream on these NICs). The
        // multi-stream path has its own test below.
        let (result, report) = try lab.migrate("vm1")
        #expect(result.succeeded, "migrate failed: \(result.stdout)\(result.stderr)")
        Thread.sleep(forTimeInterval: 1)
        watcher.stop()
        #expect(watcher.skippedSequences == 0 && !watcher.sequenceWentBack, "the guest's counter is continuous across hosts")
        #expect(watcher.heartbeatCount > 5)
        let r = try #require(report)
        #expect(r.outcome == .succeeded)
        #expect(r.streamBytes > 128 << 20, "the filled memory crossed the wire")
        #expect(r.multifdChannels == 0)
        #expect(r.security?.hasPrefix("AES-256-GCM") == true, "the lab's default is authenticated and encrypted: \(r.security ?? "nil")")
        #expect(r.qemuDowntimeMilliseconds != nil)
        #expect(r.destination.qemuCPUSeconds != nil)
        // Lifecycle in order: connected, destination waiting, channels bound, QEMU migrating,
        // destination loaded, VM runs on b.
        let order = ["connected to b", "destination QEMU", "data channel(s) bound", "QEMU started migrating",
                     "destination loaded the VM", "VM runs on b"]
        let positions = order.map { step in r.events.firstIndex { $0.what.contains(step) } }
        #expect(positions.allSatisfy { $0 != nil }, "events: \(r.events.map(\.what))")
        #expect(positions.compactMap { $0 } == positions.compactMap { $0 }.sorted(), "events out of order: \(r.events.map(\.what))")

        #expect(!ProcessStats.isAlive(pid: source.state.pid), "the source QEMU still runs")
        lab.expectAbsent("vm1", on: "a")
        try lab.expectRunningAndHealthy("vm1", on: "b")
        let after = try #require(GuestConsole(path: try lab.b.store.record("vm1").paths.serialLog).lastHeartbeat)
        #expect(after.sequence > before.sequence, "the guest's counter went on from where it was")

        // The destination's own console command shows the guest.
        let log = try lab.b.ferry(["vm", "log", "vm1"])
        #expect(log.succeeded && log.stdout.contains("FERRY-HB"))
        let list = try lab.b.ferry(["vm", "list"])
        #expect(list.stdout.contains("vm1") && list.stdout.contains("running"))

        // And back again: the destination registered everything a source needs.
        let (back, backReport) = try lab.migrate("vm1", from: "b", to: "a")
        #expect(back.succeeded, "migrate back failed: \(back.stdout)\(back.stderr)")
        #expect(backReport?.outcome == .succeeded)
        lab.expectAbsent("vm1", on: "b")
        try lab.expectRunningAndHealthy("vm1", on: "a")
    }

    /// QEMU's streams depend on one another (multifd threads wait at each sync point for
    /// the main stream), so this is also the test that no stream starves another in the
    /// shared window: it stalled before streams had a reserve of their own.
    @Test("QEMU's multifd streams carried through Ferry, sealed and copied, or spliced (zero-copy), or copied unsealed",
          arguments: ["sealed", "zero-copy", "insecure-copied"])
    func multifd(path: String) throws {
        let insecure = path != "sealed"
        let lab = try TestLab(nics: 2)
        try lab.serve(on: "b", extra: insecure ? ["--insecure"] : [])
        _ = try lab.startDemoVM("vm1", memory: 320, fill: 128, dirty: 8)
        var extra = ["--multifd", "2", "--timeout", "240s"]
        if insecure { extra += ["--insecure", "--compress", "none"] }
        if path == "insecure-copied" { extra += ["--zero-copy", "off"] }
        let (result, report) = try lab.migrate("vm1", extra: extra)
        #expect(result.succeeded, "migrate failed: \(result.stdout)")
        #expect(report?.multifdChannels == 2)
        #expect(report?.dataPath?.hasPrefix(path == "zero-copy" ? "zero-copy" : "copied") == true, "\(report?.dataPath ?? "no data path")")
        try lab.expectRunningAndHealthy("vm1", on: "b")
    }

    @Test("every --compress setting carries a compressible, dirtying guest back and forth; it verifies at the end",
          .enabled(if: Env.runSoaks, "with the soaks (FERRY_SOAKS=1): the codecs have their unit tests, and the bench harness runs auto"))
    func compressionSettings() throws {
        // 200 mbit: slow enough that the link is the bottleneck, so auto compresses.
        let lab = try TestLab(nics: 1, rate: "200mbit")
        try lab.serve(on: "a")
        try lab.serve(on: "b")
        _ = try lab.startDemoVM("vm1", memory: 256, fill: 128, dirty: 2, content: "text")
        var here = "a"
        for setting in ["none", "lz4", "zstd", "zstd:3", "auto"] {
            let there = here == "a" ? "b" : "a"
            let (result, report) = try lab.migrate("vm1", from: here, to: there, extra: ["--compress", setting])
            #expect(result.succeeded, "--compress \(setting): \(result.stdout)")
            let r = try #require(report)
            let c = try #require(r.compression)
            #expect(c.mode == (setting == "zstd" ? "zstd:1" : setting))
            let guest = r.channels.reduce(0) { $0 + $1.payloadBytes }
            let ratio = Double(guest) / Double(max(1, r.wireBytes))
            if setting == "none" {
                #expect(c.periods.allSatisfy { $0.codec == "none" })
                #expect(ratio < 1.01, "none: ratio \(ratio)")
            } else {
                // The guest's text pages compress at least 2:1 with any codec; zero pages
                // were already only flags in QEMU's stream.
                #expect(ratio > 1.6, "--compress \(setting): guest \(guest) bytes in \(r.wireBytes) on the wire")
                #expect(c.periods.contains { $0.codec != "none" }, "\(c.periods)")
            }
            if setting == "auto" {
                #expect(r.events.contains { $0.what.hasPrefix("compression: ") }, "auto reported no choice: \(r.events.map(\.what))")
            }
            here = there
        }
        try lab.expectRunningAndHealthy("vm1", on: here)
    }

    @Test("a guest Ferry did not build (any kernel and initrd) migrates, with multifd off")
    func foreignGuest() throws {
        let lab = try TestLab(nics: 1)
        try lab.serve(on: "b")
        let initrd = try Self.plainInitrd()
        let run = try lab.a.ferry(["vm", "run", "plain", "--memory", "128M", "--cpus", "1",
                                   "--kernel", Env.guest.kernel, "--initrd", initrd, "--append", "console=ttyS0 quiet"])
        try #require(run.succeeded, "vm run: \(run.stderr)")
        let console = GuestConsole(path: try lab.a.store.record("plain").paths.serialLog)
        try #require(console.wait(timeout: .seconds(60)) { $0.contains("ALIVE 5") })

        let (result, report) = try lab.migrate("plain", extra: ["--multifd", "0"])
        #expect(result.succeeded, "migrate failed: \(result.stdout)\(result.stderr)")
        #expect(report?.multifdChannels == 0)
        let lastOnA = Self.lastAlive(in: GuestConsole(path: try #require(Self.archivedLog(lab, "plain"))).text)
        let dest = GuestConsole(path: try lab.b.store.record("plain").paths.serialLog)
        #expect(dest.wait(timeout: .seconds(15)) { Self.lastAlive(in: $0) > lastOnA + 5 },
                "the plain guest's counter does not go on at b (last on a: \(lastOnA))")
    }

    enum Failure: String, CaseIterable, CustomTestStringConvertible {
        case destinationNotListening, destinationDaemonKilled, destinationQEMUKilled, garbageOnPort, wrongProtocolVersion, unknownVM
        case wrongKey, insecureSource, insecureDestination
        var testDescription: String { rawValue }
    }

    @Test("failures before the switchover leave the VM running on the source; the daemon serves the next migration",
          arguments: Failure.allCases)
    func failure(_ kind: Failure) throws {
        // 100 mbit makes a 96 MiB guest take several seconds: time to break things mid-way.
        let slow = kind == .destinationDaemonKilled || kind == .destinationQEMUKilled
        let lab = try TestLab(nics: 1, rate: slow ? "100mbit" : nil)
        var servePID: Int32? = kind == .destinationNotListening ? nil
            : try lab.serve(extra: kind == .insecureDestination ? ["--insecure"] : [])
        let source = try lab.startDemoVM("vm1", memory: 256, fill: slow ? 96 : 48, dirty: 2)

        switch kind {
        case .destinationNotListening:
            let (result, report) = try lab.migrate("vm1")
            #expect(result.status == 1)
            #expect(report?.outcome == .failedVMOnSource)
            #expect(result.stdout.contains("cannot reach ferry serve"), "\(result.stdout)")
            servePID = try lab.serve()

        case .destinationDaemonKilled, .destinationQEMUKilled:
            let outcome = Locked<(CommandResult, MigrationReport?)?>(nil)
            let thread = Thread {
                let result = try? lab.migrate("vm1")
                outcome.withLock { $0 = result }
            }
            thread.start()
            // Wait until the destination QEMU exists and data flows, then break it.
            var destPID: Int32 = 0
            let deadline = ContinuousClock.now + .seconds(30)
            while ContinuousClock.now < deadline {
                if let rec = try? lab.b.store.record("vm1"), rec.alive { destPID = rec.state.pid; break }
                Thread.sleep(forTimeInterval: 0.05)
            }
            try #require(destPID > 0, "the destination QEMU never started")
            Thread.sleep(forTimeInterval: 2)
            if kind == .destinationDaemonKilled {
                kill(servePID!, SIGKILL)
            } else {
                kill(destPID, SIGKILL)
            }
            let end = ContinuousClock.now + .seconds(60)
            while outcome.current == nil && ContinuousClock.now < end { Thread.sleep(forTimeInterval: 0.1) }
            let (result, report) = try #require(outcome.current, "ferry migrate did not finish")
            #expect(result.status == 1, "\(result.stdout)")
            #expect(report?.outcome == .failedVMOnSource)
            #expect(report?.error?.isEmpty == false)
            if kind == .destinationDaemonKilled {
                // The destination QEMU must not linger: the restarted daemon discards it.
                servePID = try lab.serve()
                let gone = ProcessStats.waitForExit(pid: destPID, timeout: .seconds(15))
                #expect(gone, "the half-received destination QEMU still runs")
            }

        case .garbageOnPort:
            let b0 = lab.lab.address("b", nic: 0)
            try lab.shell("a", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' > /dev/tcp/\(b0)/7470; head -c 65536 /dev/urandom > /dev/tcp/\(b0)/7470; exec 3<>/dev/tcp/\(b0)/7470; printf 'FERY' >&3; exec 3>&-")
            let refused = GuestConsole(path: lab.b.serveLog).wait(timeout: .seconds(5)) { $0.contains("refused connection") }
            #expect(refused, "the daemon did not log the refusal")

        case .wrongProtocolVersion:
            let hello = ControlCoding.frame(.hello, HelloMessage(minVersion: 90, maxVersion: 99, software: "future", host: "x"))
            let path = lab.lab.directory + "/hello.bin"
            try Data(hello.encoded()).write(to: URL(fileURLWithPath: path))
            let b0 = lab.lab.address("b", nic: 0)
            let reply = try lab.shell("a", "exec 3<>/dev/tcp/\(b0)/7470; cat \(path) >&3; timeout 5 cat <&3 | base64 -w0")
            var decoder = FrameDecoder()
            decoder.feed(Data(base64Encoded: reply.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? Data())
            let frame = try #require(try decoder.next(), "no answer to a hello of the wrong version")
            #expect(frame.type == .error)
            let error = try ControlCoding.decode(ErrorMessage.self, from: frame)
            #expect(error.code == .unsupportedVersion)
            #expect(error.message.contains("v90-v99"))

        case .wrongKey, .insecureSource, .insecureDestination:
            var extra: [String] = []
            if kind == .wrongKey {
                let path = lab.lab.directory + "/other.key"
                _ = FileManager.default.createFile(atPath: path, contents: Data(KeyRing(keys: [.generate()]).fileText.utf8),
                                                   attributes: [.posixPermissions: 0o600])
                extra = ["--key-file", path]
            }
            if kind == .insecureSource { extra = ["--insecure"] }
            let (result, report) = try lab.migrate("vm1", extra: extra)
            #expect(result.status == 1, "\(result.stdout)")
            #expect(report?.outcome == .failedVMOnSource)
            let why = ["not one this host holds", "requires authentication", "runs --insecure"][[Failure.wrongKey, .insecureSource, .insecureDestination].firstIndex(of: kind)!]
            #expect(result.stdout.contains("authentication failed") || result.stdout.contains("authentication-failed"), "\(result.stdout)")
            #expect(result.stdout.contains(why), "\(result.stdout)")
            if kind == .insecureSource { #expect(result.stderr.contains("WARNING"), "--insecure must say so loudly") }
            if kind == .insecureDestination {
                // Back to a daemon with the key, for the next migration.
                ProcessStats.terminate(pid: servePID!)
                servePID = try lab.serve()
            }

        case .unknownVM:
            let (result, report) = try lab.migrate("no-such-vm")
            #expect(result.status == 1)
            #expect(result.stdout.contains("no VM named 'no-such-vm'"), "\(result.stdout)")
            #expect(report?.outcome == .failedVMOnSource)
        }

        // The VM runs on the source, untouched and healthy; nothing is left on b.
        #expect(ProcessStats.isAlive(pid: source.state.pid))
        try lab.expectRunningAndHealthy("vm1", on: "a")
        lab.expectAbsent("vm1", on: "b")
        let phase = try lab.a.store.record("vm1").state.phase
        #expect(phase == .running)

        // The daemon serves the next migration.
        #expect(servePID.map { ProcessStats.isAlive(pid: $0) } == true)
        let (result, report) = try lab.migrate("vm1")
        #expect(result.succeeded, "the next migration failed: \(result.stdout)")
        #expect(report?.outcome == .succeeded)
        try lab.expectRunningAndHealthy("vm1", on: "b")
    }

    // MARK: Helpers

    /// A minimal initramfs of our own: busybox and a shell loop that counts.
    static func plainInitrd() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("plain-initrd-\(getpid())").path
        let script = """
            set -e
            rm -rf \(dir); mkdir -p \(dir)/root/bin \(dir)/root/proc
            cp /bin/busybox \(dir)/root/bin/busybox
            cat > \(dir)/root/init <<'INIT'
            #!/bin/busybox sh
            i=0
            while true; do i=$((i+1)); /bin/busybox echo "ALIVE $i" > /dev/console; /bin/busybox usleep 100000; done
            INIT
            chmod +x \(dir)/root/init
            cd \(dir)/root && find . | cpio -o -H newc --quiet | gzip -1 > \(dir)/plain.img
            """
        let result = try Command.run(["bash", "-c", script])
        try #require(result.succeeded, "building the plain initrd: \(result.stderr)")
        return dir + "/plain.img"
    }

    static func lastAlive(in text: String) -> Int {
        text.split(separator: "\n").reversed().lazy.compactMap { line -> Int? in
            guard let r = line.range(of: "ALIVE ") else { return nil }
            return Int(line[r.upperBound...].prefix { $0.isNumber })
        }.first ?? -1
    }

    static func archivedLog(_ lab: TestLab, _ name: String) -> String? {
        let dir = lab.lab.stateDirectory("a") + "/logs"
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return files.first { $0.hasPrefix(name + "-") && $0.hasSuffix("-migrated.log") }.map { dir + "/" + $0 }
    }
}
