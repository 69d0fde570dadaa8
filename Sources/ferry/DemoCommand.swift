import ArgumentParser
import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import Foundation

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The whole product on one machine: lab, guest, a running VM, a live migration, proof, report.",
        discussion: """
            Builds the demo guest, brings up a lab (hosts a and b in network namespaces, and a VM
            network with a client), starts a VM on a whose workload fills and keeps dirtying its
            memory while checking it, with a NIC on the VM network and an echo service, starts
            `ferry serve` on b, migrates the VM from a to b while the client probes it (UDP every
            10 ms, one TCP connection), then proves it kept running: its heartbeats go on at b,
            its own memory check stays OK, the source QEMU is gone, the client's TCP connection
            held, and the probes lost during the move are counted.
            """)

    @Option(help: "NICs between the two lab hosts (default: 2).")
    var nics = 2

    @Option(help: "Rate of each lab NIC, as tc writes it, or 'none' (default: 1gbit).")
    var rate = "1gbit"

    @Option(help: "Guest memory (default: 768M).")
    var memory = MemorySize(mebibytes: 768)

    @Option(help: "Memory the guest workload fills with data, MiB (default: 512).")
    var fill = 512

    @Option(help: "Rate at which the workload keeps rewriting its memory, MiB/s (default: 8).")
    var dirty = 8

    @Option(help: "Rate at which the workload re-verifies all its memory, MiB/s, or 0 for as fast as it can (default: 256: a full pass every 2 s, leaving CPU to the migration on small hosts).")
    var verify = 256

    @Option(help: "Guest vCPUs (default: 2).")
    var cpus = 2

    @Option(help: "QEMU multifd channels, or auto (default: auto).")
    var multifd = "auto"

    @Flag(help: "Leave the lab up afterwards (ferry lab down --name demo removes it).")
    var keep = false

    func validate() throws {
        guard fill >= 1 && fill + 128 <= memory.mebibytes else {
            throw ValidationError("--fill must be at least 1 and leave 128 MiB of --memory for the guest kernel")
        }
        guard rate == "none" || (try? Lab.validateRates(rate, nics: nics)) != nil else {
            throw ValidationError("--rate must be like 1gbit, one rate per NIC (1gbit,500mbit), or none")
        }
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        let lab = Lab(name: "demo")
        let binary = SelfPath.executable
        let a = LabHost(lab: lab, host: "a", binary: binary)
        let b = LabHost(lab: lab, host: "b", binary: binary)
        let vm = "demo"

        step("1/6 demo guest")
        let image = GuestImage()
        try image.build()

        step("2/6 lab: hosts a and b, \(nics) NIC(s) at \(rate)")
        if lab.isUp { try lab.down() }
        try lab.up(nics: nics, rate: rate == "none" ? nil : rate)
        defer {
            if !keep {
                try? lab.down()
                print("lab removed")
            }
        }

        let address = lab.guestAddress(0)
        step("3/6 VM '\(vm)' on a: \(memory.mebibytes) MiB, \(cpus) vCPU, workload fills \(fill) MiB and dirties \(dirty) MiB/s; NIC on \(Lab.vmBridge) at \(address)")
        let run = try a.ferry(["vm", "run", vm, "--memory", "\(memory.mebibytes)M", "--cpus", "\(cpus)",
                               "--kernel", image.kernel, "--initrd", image.initrd,
                               "--append", GuestImage.append(fillMiB: fill, dirtyMiBPerSecond: dirty,
                                                             verifyMiBPerSecond: verify > 0 ? verify : nil)
                                   + " ferry.ip=\(address)/\(Lab.vmNetworkPrefix)",
                               "--nic", "bridge=\(Lab.vmBridge)"])
        guard run.succeeded else { throw UserError("vm run failed: \(run.stderr)\(run.stdout)") }
        print(run.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        let sourceRecord = try a.store.record(vm)
        let console = GuestConsole(path: sourceRecord.paths.serialLog)
        var lastFill = ""
        let ready = console.wait(timeout: .seconds(300), poll: .milliseconds(250)) { text in
            if let line = text.split(separator: "\n").last(where: { $0.contains("FERRY-FILL") }), String(line) != lastFill {
                lastFill = String(line)
                print("  guest: \(line.trimmingCharacters(in: .whitespacesAndNewlines))")
            }
            return text.contains("FERRY-READY")
        }
        guard ready else { throw UserError("the guest did not finish filling its memory in 300 s; see ferry lab exec a -- ferry vm log \(vm)") }
        Thread.sleep(forTimeInterval: 1)
        guard let before = console.lastHeartbeat, before.ok else { throw UserError("the guest reports no healthy heartbeat before the migration") }
        print("  guest ready: heartbeat \(before.sequence), memory check OK (\(before.passes) full passes)")

        step("4/6 ferry serve on b")
        let servePID = try b.startServe()
        print("  listening on \(lab.address("b", nic: 0)):7470 (pid \(servePID))")

        step("5/6 migrate a -> b, the client probing the guest")
        let probe = try ClientProbe(lab: lab, binary: binary, address: address)
        print("  client (\(lab.vmNetworkAddress(Lab.client))): ferry probe \(address), UDP every 10 ms and one TCP connection")
        let watcher = HeartbeatWatcher(paths: [sourceRecord.paths.serialLog])
        watcher.add(path: b.store.vmPaths(vm).serialLog)
        let reportPath = lab.directory + "/demo-report.json"
        let status = try a.ferryInteractive(["migrate", vm, "--to", lab.address("b", nic: 0),
                                             "--multifd", "\(multifd)", "--report-file", reportPath, "--probe", address])
        let seen = try? probe.stop()
        guard status == 0 else { throw UserError("the migration failed (exit \(status)); the VM stays on a") }

        step("6/6 verify")
        Thread.sleep(forTimeInterval: 2)
        watcher.stop()
        let destination = try b.store.record(vm)
        let destConsole = GuestConsole(path: destination.paths.serialLog)
        guard let after = destConsole.lastHeartbeat else { throw UserError("no heartbeat from the guest on b") }
        var failures: [String] = []
        if !destination.alive { failures.append("the VM's QEMU on b is not running") }
        if after.sequence <= before.sequence { failures.append("heartbeats did not continue on b (\(before.sequence) -> \(after.sequence))") }
        if watcher.skippedSequences > 0 || watcher.sequenceWentBack {
            failures.append("the guest's heartbeat counter is not continuous across the hosts (\(watcher.skippedSequences) missing)")
        }
        if !after.ok || watcher.sawErrors { failures.append("the guest's memory check failed: \(destConsole.errorLines.prefix(3))") }
        if ProcessStats.isAlive(pid: sourceRecord.state.pid) { failures.append("the source QEMU (pid \(sourceRecord.state.pid)) still runs") }
        if (try? a.store.record(vm)) != nil { failures.append("host a still lists the VM") }
        if let seen {
            if !seen.tcpConnected || seen.tcpBroken != nil { failures.append("the client's TCP connection to the guest did not hold: \(seen.summary)") }
            if seen.answered == 0 { failures.append("the guest never answered the client's probes") }
            print("  client's view of the guest's network: \(seen.summary)")
        } else {
            failures.append("the client's probe wrote no result")
        }
        print("  heartbeats: \(before.sequence) on a before -> \(after.sequence) on b now; \(watcher.heartbeatCount) seen during the migration (none missing: \(watcher.skippedSequences == 0)), largest gap \(Int(watcher.largestGapSeconds * 1000)) ms")
        print("  guest memory check: \(after.ok ? "OK" : "FAILED") (\(after.passes) full passes, \(after.errors) errors)")
        print("  source QEMU pid \(sourceRecord.state.pid): \(ProcessStats.isAlive(pid: sourceRecord.state.pid) ? "STILL RUNNING" : "gone")")
        print("  destination QEMU pid \(destination.state.pid): \(destination.alive ? "running" : "NOT RUNNING")")
        ProcessStats.terminate(pid: servePID)
        if !failures.isEmpty {
            throw UserError("demo verification failed:\n  " + failures.joined(separator: "\n  "))
        }
        print("\nDemo passed: \(vm) moved from a to b while running, and its memory is intact.")
    }

    private func step(_ text: String) {
        print("\n== \(text)")
    }
}
