import FerryIO
import FerryLab
import Foundation
import Testing

/// The lab itself: namespaces, NICs, addresses, per-host state, NIC failure, teardown.
@Suite("Lab", .serialized, .enabled(if: Env.canRunLab && FileManager.default.isExecutableFile(atPath: Env.ferry), "needs root and the ferry binary"))
struct LabTests {
    func ferry(_ args: [String]) throws -> CommandResult { try Command.run([Env.ferry] + args) }

    @Test("lab up, reach b over every NIC, per-host state, a NIC down and up, lab down")
    func lifecycle() throws {
        let name = "lt\(Int.random(in: 100...999))"
        let up = try ferry(["lab", "up", "--name", name, "--nics", "3", "--rate", "200mbit"])
        #expect(up.succeeded, "\(up.stderr)")
        defer { _ = try? ferry(["lab", "down", "--name", name]) }
        let lab = Lab(name: name)
        #expect(lab.isUp)
        #expect(try ferry(["lab", "up", "--name", name]).status != 0, "a second lab up must refuse")

        let addrs = try ferry(["lab", "addr", "b", "--name", name]).stdout.split(separator: "\n").map(String.init)
        #expect(addrs == ["10.77.1.2", "10.77.2.2", "10.77.3.2"])
        for addr in addrs {
            let ping = try ferry(["lab", "exec", "a", "--name", name, "--", "ping", "-c1", "-W2", addr])
            #expect(ping.succeeded, "a cannot reach \(addr)")
        }
        // Each host has its own Ferry state.
        let stateA = try ferry(["lab", "exec", "a", "--name", name, "--", "printenv", "FERRY_STATE_DIR"]).stdout
        let stateB = try ferry(["lab", "exec", "b", "--name", name, "--", "printenv", "FERRY_STATE_DIR"]).stdout
        #expect(!stateA.isEmpty && stateA != stateB)
        #expect(try ferry(["lab", "exec", "a", "--name", name, "--", "ferry", "vm", "list"]).stdout.contains("no VMs"))
        // veth's made-up speed is not believed; the lab tells Ferry the tc rate instead.
        let status = try ferry(["lab", "exec", "a", "--name", name, "--", "ferry", "status"]).stdout
        #expect(status.contains("eth0") && status.contains("0.20 Gbit/s"), "\(status)")
        let unrated = try ferry(["lab", "exec", "a", "--name", name, "--", "env", "-u", "FERRY_NIC_SPEEDS", Env.ferry, "status"]).stdout
        #expect(unrated.contains("speed unknown"), "\(unrated)")
        // The rate is set on both ends.
        let qdisc = try Command.run(["tc", "-n", "\(name)-b", "qdisc", "show", "dev", "eth1"]).stdout
        #expect(qdisc.contains("tbf") && qdisc.contains("200Mbit"))

        #expect(try ferry(["lab", "nic", "down", "a", "1", "--name", name]).succeeded)
        #expect(!(try ferry(["lab", "exec", "a", "--name", name, "--", "ping", "-c1", "-W1", "10.77.2.2"]).succeeded))
        #expect(try ferry(["lab", "exec", "a", "--name", name, "--", "ping", "-c1", "-W2", "10.77.1.2"]).succeeded)
        #expect(try ferry(["lab", "nic", "up", "a", "1", "--name", name]).succeeded)
        Thread.sleep(forTimeInterval: 0.5)
        #expect(try ferry(["lab", "exec", "a", "--name", name, "--", "ping", "-c1", "-W2", "10.77.2.2"]).succeeded)
        #expect(try ferry(["lab", "nic", "down", "a", "7", "--name", name]).status != 0, "NIC 7 does not exist")

        #expect(try ferry(["lab", "down", "--name", name]).succeeded)
        #expect(!lab.isUp)
        #expect(!(try Command.run(["ip", "netns", "list"]).stdout.contains("\(name)-a")))
        #expect(!FileManager.default.fileExists(atPath: lab.directory))
    }

    @Test("lab commands on a lab that is not up fail clearly")
    func notUp() throws {
        let r = try ferry(["lab", "exec", "a", "--name", "nolab", "--", "true"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("not up"))
    }
}

/// The demo guest's workload, run on the host: it checks itself and catches corruption.
@Suite("Demo guest workload", .enabled(if: FileManager.default.isExecutableFile(atPath: Env.guest.directory + "/ferry-workload")))
struct WorkloadTests {
    var binary: String { Env.guest.directory + "/ferry-workload" }

    @Test("fills, dirties and verifies its memory, heartbeating")
    func runs() throws {
        let r = try Command.run([binary, "--cmdline", "ferry.mem=16 ferry.dirty=8 ferry.fill=text", "--seconds", "2"])
        #expect(r.succeeded, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("FERRY-READY") || r.stderr.contains("FERRY-READY"))
        let beats = (r.stdout + r.stderr).split(separator: "\n").filter { $0.hasPrefix("FERRY-HB") }
        #expect(beats.count >= 10)
        #expect(beats.allSatisfy { $0.contains("status=OK") })
    }

    @Test("a flipped byte in guest memory is reported")
    func detectsCorruption() throws {
        let r = try Command.run([binary, "--corrupt-test"])
        #expect(r.succeeded, "\(r.stdout)\(r.stderr)")
        #expect((r.stdout + r.stderr).contains("FERRY-ERROR"))
    }
}
