@testable import FerryLibvirt
import Testing

/// The binding against libvirt's own test driver (`test:///default`, in the library: no
/// daemon), which keeps a running domain "test" and takes new definitions in memory.
@Suite struct LibvirtTests {
    func connection() throws -> Libvirt.Connection {
        try Libvirt.load().connect("test:///default")
    }

    @Test func loadsAndReadsADomain() throws {
        let libvirt = try Libvirt.load()
        #expect(libvirt.libraryVersion.split(separator: ".").count == 3)
        let domain = try connection().domain("test")
        #expect(try domain.state() == .running)
        #expect(try domain.xml().contains("<name>test</name>"))
        // No job runs: nothing, or an inactive account.
        #expect(domain.jobStatistics()?.isActive != true)
    }

    @Test func missingDomainCarriesLibvirtsMessage() throws {
        let c = try connection()
        do throws(Libvirt.Failure) {
            _ = try c.domain("no-such-domain")
            Issue.record("a missing domain was found")
        } catch {
            #expect(error.code == Libvirt.Failure.noDomain)
            #expect(!error.message.isEmpty)
        }
    }

    @Test func definesStartsStopsUndefines() throws {
        let c = try connection()
        let xml = """
            <domain type='test'><name>ferry-probe</name><memory unit='MiB'>64</memory>
            <os><type arch='x86_64'>hvm</type></os></domain>
            """
        let domain = try c.define(xml: xml)
        #expect(domain.name == "ferry-probe")
        #expect(try domain.state() == .shutoff)
        try domain.start()
        #expect(try domain.state() == .running)
        try domain.destroy()
        #expect(try domain.state() == .shutoff)
        try domain.undefine()
        #expect(throws: Libvirt.Failure.self) { try c.domain("ferry-probe") }
    }

    @Test func badURIFailsWithLibvirtsReason() throws {
        let libvirt = try Libvirt.load()
        do throws(Libvirt.Failure) {
            _ = try libvirt.connect("qemu+unix:///system?socket=/nonexistent/ferry-test.sock")
            Issue.record("connected to a socket that does not exist")
        } catch {
            #expect(error.message.contains("/nonexistent/ferry-test.sock"))
        }
    }

    @Test func requestParametersNameOneSocketPathForBothHosts() {
        var p = MigrationParameters()
        p.uri = "unix:///run/ferry/libvirt/x/migration.sock"
        p.parallelConnections = 4
        #expect(p.uri == "unix:///run/ferry/libvirt/x/migration.sock")
        #expect(p.parallelConnections == 4)
        p.parallelConnections = nil
        #expect(p.ints.isEmpty)
        #expect(MigrationFlags([.live, .peerToPeer]).rawValue == 3)
        #expect(MigrationFlags.parallel.rawValue == 1 << 17)
    }

    @Test func qemuOwnerFromTheDACBaseLabel() {
        let xml = """
            <capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>
            <secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+994</baselabel>
            <baselabel type='qemu'>+64055:+994</baselabel></secmodel></host></capabilities>
            """
        let owner = Libvirt.Connection.qemuOwner(capabilities: xml)
        #expect(owner?.uid == 64055 && owner?.gid == 994)
        #expect(Libvirt.Connection.qemuOwner(capabilities: xml.replacingOccurrences(of: "+64055:+994", with: "+0:+0")) == nil)
        #expect(Libvirt.Connection.qemuOwner(capabilities: "<capabilities/>") == nil)
    }
}
