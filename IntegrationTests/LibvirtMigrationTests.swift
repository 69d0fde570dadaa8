import FerryIO
import FerryLab
import FerryLibvirt
import FerryMigration
import FerryVM
import Foundation
import Testing

/// libvirt domains migrated by libvirt over Ferry (`ferry migrate --libvirt`), in a lab with
/// a libvirtd per host (`ferry lab up --libvirt`): real libvirtds, real QEMUs, real
/// namespaces. The domains boot the demo guest with a qcow2 disk (its disk workload
/// checks what it wrote) and a NIC on the VM bridge (its echo service answers the client).
@Suite(.serialized, .enabled(if: Env.canRunEndToEnd && LabLibvirt.missing == nil))
struct LibvirtMigrationTests {
    /// A lab domain: its XML, its console (one file both hosts' QEMUs append to).
    struct Domain {
        let name: String
        let console: GuestConsole
        let address: String
    }

    enum Disk { case shared, local }

    static func virsh(_ lab: TestLab, _ host: String, _ args: [String]) throws -> CommandResult {
        try Command.run(["virsh", "-c", LabLibvirt(lab: lab.lab).uri(host)] + args)
    }

    /// libvirt's view of `name` on `host` (nil: not defined there).
    static func state(_ lab: TestLab, _ host: String, _ name: String) -> Libvirt.State? {
        try? Libvirt.load().connect(LabLibvirt(lab: lab.lab).uri(host)).domain(name).state()
    }

    /// Where `host` keeps a local disk, as its own libvirtd sees it and as seen from here.
    static func localImage(_ lab: TestLab, _ host: String, _ name: String) -> (inHost: String, outside: String) {
        ("/var/lib/libvirt/images/\(name).qcow2", LabLibvirt(lab: lab.lab).root(host) + "/lib/images/\(name).qcow2")
    }

    /// Defines `name` on a and starts it; waits until its guest has filled its memory.
    /// `shared`: its disk in the lab's shared directory (the same file on both hosts);
    /// `local`: in a's own images directory (a copy is made on b, empty, as an operator would).
    static func startDomain(_ lab: TestLab, _ name: String, n: Int, disk: Disk, memoryMiB: Int = 256, fillMiB: Int = 96,
                            dirty: Int = 4, start: Bool = true) throws -> Domain {
        let shared = LabLibvirt(lab: lab.lab).sharedDirectory
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        let image: String
        switch disk {
        case .shared:
            image = "\(shared)/\(name).qcow2"
            try Command.check(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"])
        case .local:
            let a = localImage(lab, "a", name)
            try FileManager.default.createDirectory(atPath: (a.outside as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try Command.check(["qemu-img", "create", "-q", "-f", "qcow2", a.outside, "64M"])
            image = a.inHost
        }
        let console = "\(shared)/\(name).console"
        let address = lab.lab.guestAddress(n)
        let mac = String(format: "52:54:00:00:20:%02x", n)
        let xml = LabLibvirt(lab: lab.lab).domainXML(
            name: name, memoryMiB: memoryMiB, kernel: Env.guest.kernel, initrd: Env.guest.initrd,
            cmdline: GuestImage.append(fillMiB: fillMiB, dirtyMiBPerSecond: dirty, fill: "random", verifyMiBPerSecond: 64)
                + " ferry.ip=\(address)/24 ferry.disk=vda ferry.diskmib=16 ferry.diskrate=2",
            image: image, console: console, mac: mac)
        let xmlPath = "\(shared)/\(name).xml"
        try Data(xml.utf8).write(to: URL(fileURLWithPath: xmlPath))
        let defined = try virsh(lab, "a", ["define", xmlPath])
        try #require(defined.succeeded, "virsh define: \(defined.stderr)")
        let domain = Domain(name: name, console: GuestConsole(path: console), address: address)
        guard start else { return domain }
        let started = try virsh(lab, "a", ["start", name])
        try #require(started.succeeded, "virsh start: \(started.stderr)")
        let ready = domain.console.wait(timeout: .seconds(90)) { $0.contains("FERRY-READY") }
        try #require(ready, "the domain's guest never became ready: \(domain.console.text.suffix(800))")
        let writing = domain.console.wait(timeout: .seconds(20)) { _ in domain.console.lastDiskStatus != nil }
        try #require(writing, "the guest's disk workload never reported: \(domain.console.text.suffix(800))")
        return domain
    }

    /// The guest runs on, its memory and its disk check out, and it answers on its NIC.
    static func expectHealthy(_ lab: TestLab, _ domain: Domain, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let console = domain.console
        let first = try #require(console.lastHeartbeat, "no heartbeat", sourceLocation: sourceLocation)
        let advanced = console.wait(timeout: .seconds(20)) { _ in (console.lastHeartbeat?.sequence ?? 0) >= first.sequence + 5 }
        #expect(advanced, "heartbeats do not advance", sourceLocation: sourceLocation)
        let allOK = console.heartbeats.allSatisfy { $0.ok }
        #expect(allOK, "guest memory check failed: \(console.errorLines.prefix(3))", sourceLocation: sourceLocation)
        let disk = try #require(console.lastDiskStatus, "no disk account from the guest", sourceLocation: sourceLocation)
        #expect(disk.errors == 0 && disk.checked > 0, "guest disk check: \(disk)", sourceLocation: sourceLocation)
        let ping = try lab.shell(Lab.client, "ping -c 3 -W 2 \(domain.address)")
        #expect(ping.succeeded, "the guest does not answer on its NIC: \(ping.stdout)", sourceLocation: sourceLocation)
    }

    func migrate(_ lab: TestLab, _ name: String, extra: [String]) throws -> (CommandResult, MigrationReport?) {
        try lab.migrate(name, extra: ["--libvirt"] + extra)
    }

    /// One lab for what a lab of libvirt costs (two libvirtds probing QEMU, 15-20 s here):
    /// refusals first, with the domains on a, then the two kinds of migration.
    @Test("bad input is refused with libvirt's own message and changes nothing; a domain on shared storage moves over both NICs (persistent on b, undefined on a); one with a local disk is copied with --parallel 2")
    func migrations() throws {
        let lab = try TestLab(nics: 2, rate: "1gbit", libvirt: true)
        try lab.serve()
        let web = try Self.startDomain(lab, "web", n: 1, disk: .shared)
        let db = try Self.startDomain(lab, "db", n: 2, disk: .local)
        _ = try Self.startDomain(lab, "idle", n: 3, disk: .shared, start: false)

        // Bad input: each refused before anything moves, the domains as they were.
        let cases: [(args: [String], name: String, expect: String)] = [
            ([], "nosuch", "no domain 'nosuch'"),
            ([], "idle", "not running"),
            (["--libvirt-uri", "qemu+unix:///system?socket=/run/nonexistent/libvirt-sock"], "db", "cannot connect to libvirtd"),
            // libvirt's own refusal, passed through: a disk neither shared nor copied.
            ([], "db", "Unsafe migration"),
            // b has no image at the disk's path (yet).
            (["--copy-storage"], "db", "no storage pool"),
        ]
        for c in cases {
            let (result, report) = try migrate(lab, c.name, extra: c.args)
            #expect(result.status == 1, "\(c.name) \(c.args): exit \(result.status)")
            let error = report?.error ?? ""
            #expect(error.contains(c.expect), "\(c.name) \(c.args): \(error)")
            #expect(Self.state(lab, "a", "db") == .running)
            #expect(Self.state(lab, "b", "db") == nil)
        }
        #expect(Self.state(lab, "a", "idle") == .shutoff)
        // libvirtd on b stopped: the destination refuses the offer, and says why.
        let lv = LabLibvirt(lab: lab.lab)
        lv.stopDaemon("b")
        let (refused, refusal) = try migrate(lab, "web", extra: ["--unsafe"])
        #expect(refused.status == 1)
        #expect(refusal?.error?.contains("libvirtd is not running") == true, "\(refusal?.error ?? "")")
        #expect(Self.state(lab, "a", "web") == .running)
        try lv.restartDaemon("b")

        // Shared storage: the domain moves, striped over both NICs.
        let (result, report) = try migrate(lab, "web", extra: ["--unsafe", "--persistent", "--undefine-source"])
        #expect(result.succeeded, "\(result.stderr)\n\(report?.text ?? "")")
        let r = try #require(report)
        #expect(r.outcome == .succeeded)
        #expect(Self.state(lab, "b", "web") == .running)
        #expect(Self.state(lab, "a", "web") == nil, "--undefine-source: the domain must be gone from a")
        let persistent = try Self.virsh(lab, "b", ["dominfo", "web"]).stdout
        #expect(persistent.contains("Persistent:") && persistent.contains("yes"), "--persistent: \(persistent)")
        #expect(r.libvirt?.connections.contains("libvirtd 1") == true && r.libvirt?.connections.contains("migration 1") == true,
                "\(r.libvirt?.connections ?? "")")
        for nic in ["eth0", "eth1"] {
            let bytes = r.channels.filter { $0.interface == nic }.reduce(0) { $0 + $1.payloadBytes }
            #expect(bytes > 20 << 20, "\(nic) carried \(bytes) bytes")
        }
        try Self.expectHealthy(lab, web)

        // A local disk, copied, and QEMU's three streams (main + 2 parallel) reaching b in
        // order. The destination's image: the same path, empty, as an operator makes it
        // (libvirt creates one only inside a storage pool).
        let b = Self.localImage(lab, "b", "db")
        try FileManager.default.createDirectory(atPath: (b.outside as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try Command.check(["qemu-img", "create", "-q", "-f", "qcow2", b.outside, "64M"])
        let written = try #require(db.console.lastDiskStatus).written
        let (copied, copyReport) = try migrate(lab, "db", extra: ["--copy-storage", "--parallel", "2"])
        #expect(copied.succeeded, "\(copied.stderr)\n\(copyReport?.text ?? "")")
        let c = try #require(copyReport)
        #expect(c.libvirt?.connections.contains("migration 3") == true, "\(c.libvirt?.connections ?? "")")
        #expect(c.libvirt?.connections.contains("disks 1") == true, "\(c.libvirt?.connections ?? "")")
        #expect(Self.state(lab, "b", "db") == .running)
        #expect(Self.state(lab, "a", "db") == .shutoff, "without --undefine-source the domain stays defined, shut off, on a")
        try Self.expectHealthy(lab, db)
        // What the guest wrote before the copy is read back on b, and it goes on writing.
        let after = try #require(db.console.lastDiskStatus)
        #expect(after.written > written && after.checked > 0 && after.errors == 0)
        let info = try Command.run(["qemu-img", "info", "--force-share", "--output=json", b.outside]).stdout
        let size = info.range(of: "\"actual-size\": ").map { info[$0.upperBound...].prefix { $0.isNumber } }.flatMap { UInt64($0) } ?? 0
        #expect(size > 8 << 20, "b's image is still nearly empty (\(size) bytes)")
    }

    @Test("a session that dies mid-migration: libvirt aborts and the domain runs on a (ferry migrate killed, ferry serve killed, every NIC pulled, libvirtd on b stopped)")
    func sessionDies() throws {
        // 2 x 100 Mbit/s: the memory takes ~12 s, time to break things midway.
        let lab = try TestLab(nics: 2, rate: "100mbit", libvirt: true)
        let lv = LabLibvirt(lab: lab.lab)
        var serve = try lab.serve()
        let domain = try Self.startDomain(lab, "app", n: 5, disk: .shared, memoryMiB: 320, fillMiB: 192)
        enum Fault: String, CaseIterable { case killMigrate, killServe, pullNICs, stopLibvirtd }
        for fault in Fault.allCases {
            let running = RunningMigration(lab, "app", extra: ["--libvirt", "--unsafe", "--link-timeout", "5"])
            // libvirt's own account on a: 32 MiB of memory sent, a third of the way.
            let job = try Libvirt.load().connect(lv.uri("a")).domain("app")
            let deadline0 = ContinuousClock.now + .seconds(60)
            while (job.jobStatistics()?.memoryProcessed ?? 0) < 32 << 20 && ContinuousClock.now < deadline0 { usleep(50_000) }
            let going = (job.jobStatistics()?.memoryProcessed ?? 0) >= 32 << 20
            #expect(going, "\(fault): the migration never got going: \(GuestConsole(path: running.progressPath).text.suffix(600))")
            switch fault {
            case .killMigrate:
                let pid = try #require(LibvirtMigrationFile(runDirectory: lab.a.store.paths.runDirectory, domain: "app").runningPID)
                kill(pid, SIGKILL)
            case .killServe:
                kill(serve, SIGKILL)
            case .pullNICs:
                for nic in 0..<2 { try lab.lab.setNIC("a", nic: nic, up: false) }
            case .stopLibvirtd:
                lv.stopDaemon("b")
            }
            let (result, report) = try running.finish(timeout: .seconds(120))
            if fault != .killMigrate {
                #expect(result.status == 1, "\(fault): exit \(result.status)")
                #expect(report?.outcome == .failedVMOnSource, "\(fault): \(report?.text ?? result.stderr)")
            }
            // libvirt keeps the switchover: the domain runs on a, and b has none running.
            let deadline = ContinuousClock.now + .seconds(60)
            while Self.state(lab, "a", "app") != .running && ContinuousClock.now < deadline { usleep(200_000) }
            #expect(Self.state(lab, "a", "app") == .running, "\(fault): the domain is \(String(describing: Self.state(lab, "a", "app"))) on a")
            switch fault {
            case .killMigrate, .pullNICs: break
            case .killServe: serve = try lab.serve()
            case .stopLibvirtd: try lv.restartDaemon("b")
            }
            if fault == .pullNICs { for nic in 0..<2 { try lab.lab.setNIC("a", nic: nic, up: true) } }
            while Self.state(lab, "b", "app") == .running && ContinuousClock.now < deadline { usleep(200_000) }
            #expect(Self.state(lab, "b", "app") != .running, "\(fault): a copy runs on b too")
            try Self.expectHealthy(lab, domain)
        }
        // And after all that, the migration goes through.
        let (result, report) = try migrate(lab, "app", extra: ["--unsafe"])
        #expect(result.succeeded, "\(report?.text ?? result.stderr)")
        #expect(Self.state(lab, "b", "app") == .running)
    }
}
