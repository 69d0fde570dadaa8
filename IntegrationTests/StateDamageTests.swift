import FerryIO
import FerryLab
import FerryVM
import Foundation
import Testing

/// Issue 18: a running VM whose files are damaged stays visible, is never started twice
/// (by `vm run` or by an incoming migration), can be repaired and can be stopped. Real
/// QEMU under TCG, the real binary, the lab's two hosts (whose QEMUs share one process
/// namespace, so a VM of the same name on the other host must never be taken for this one).
@Suite("Damaged state files", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest (scripts/test.sh)"))
struct StateDamageTests {
    static func damage(_ path: String) throws {
        try Data("{\"phase\": \"runn".utf8).write(to: URL(fileURLWithPath: path))
    }

    @Test("state.json, spec.json and handover.json damaged in turn: listed as damaged, never run twice, repaired, stopped")
    func damagedFiles() throws {
        let lab = try TestLab(nics: 1)
        try lab.serve(on: "b")
        let vm = try lab.startDemoVM("vm1", memory: 256, fill: 32, dirty: 2)
        let pid = vm.state.pid
        let paths = vm.paths
        let run = ["vm", "run", "vm1", "--memory", "256M", "--kernel", Env.guest.kernel, "--initrd", Env.guest.initrd,
                   "--append", GuestImage.append(fillMiB: 32, dirtyMiBPerSecond: 2, fill: "random")]

        // The same name on b, its files damaged too: an offer of vm1 from a is refused
        // there, and b's QEMU is left alone (still the only one of b's vm1).
        let other = try lab.startDemoVM("vm1", on: "b", memory: 256, fill: 32, dirty: 2)
        try Self.damage(other.paths.state)
        let (migrated, report) = try lab.migrate("vm1")
        #expect(!migrated.succeeded, "a second QEMU of vm1 was offered to b: \(migrated.stdout)")
        // Refused with the offer, before boot files or RAM move, as the VM that exists.
        #expect(report?.error?.contains("already runs on") == true && report?.error?.contains("vm-exists") == true,
                "\(report?.error ?? migrated.stdout)")
        #expect(report?.failedPhase == "negotiating", "\(report?.failedPhase ?? "-")")
        #expect(UpdateTests.qemuCopies(of: other.paths.memoryFile) == [other.state.pid], "b runs vm1 twice")
        #expect(try lab.a.store.ownsQEMU(pid: pid, name: "vm1") && lab.a.store.record("vm1").state.phase == .running)
        #expect(lab.b.store.qemus(of: "vm1").map(\.pid) == [other.state.pid])
        #expect(lab.a.store.qemus(of: "vm1").map(\.pid) == [pid], "a's store must not take b's vm1 for its own")
        let stopB = try lab.b.ferry(["vm", "stop", "vm1"])
        #expect(stopB.succeeded, "\(stopB.stderr)")
        #expect(!ProcessStats.isAlive(pid: other.state.pid))

        for file in [paths.state, paths.spec, paths.handover] {
            let what = (file as NSString).lastPathComponent
            try Self.damage(file)

            let list = try lab.a.ferry(["vm", "list"])
            #expect(list.succeeded && list.stdout.contains("damaged"), "\(what): \(list.stdout)\(list.stderr)")
            #expect(list.stdout.contains("\(what) is not JSON") || list.stdout.contains("\(what) has"), "\(what): \(list.stdout)")
            #expect(list.stdout.contains("\(pid)") && list.stdout.contains("ferry vm repair vm1"), "\(what): \(list.stdout)")
            let json = try lab.a.ferry(["vm", "list", "--json"])
            #expect(json.stdout.contains("\"damaged\""), "\(what): \(json.stdout)")

            let again = try lab.a.ferry(run)
            #expect(!again.succeeded, "\(what): vm run started vm1 twice: \(again.stdout)")
            #expect(again.stderr.contains("already runs here"), "\(what): \(again.stderr)")
            #expect(UpdateTests.qemuCopies(of: paths.memoryFile) == [pid], "\(what): vm1 runs twice")

            if file == paths.handover {
                let refused = try lab.a.ferry(["vm", "repair", "vm1"])
                #expect(!refused.succeeded && refused.stderr.contains("--drop-handover"), "\(refused.stdout)\(refused.stderr)")
            }
            let repair = try lab.a.ferry(["vm", "repair", "vm1"] + (file == paths.handover ? ["--drop-handover"] : []))
            #expect(repair.succeeded && repair.stdout.contains("repaired"), "\(what): \(repair.stdout)\(repair.stderr)")
            let record = try lab.a.store.record("vm1")
            #expect(record.alive && record.state.pid == pid && record.state.phase == .running, "\(what)")
            #expect(try lab.a.store.readHandover("vm1") == nil)
            #expect(!(try lab.a.ferry(["vm", "list"])).stdout.contains("damaged"), "\(what): still damaged after repair")
        }
        try lab.expectRunningAndHealthy("vm1", on: "a")

        // Stop with its state damaged once more.
        try Self.damage(paths.state)
        let stop = try lab.a.ferry(["vm", "stop", "vm1"])
        #expect(stop.succeeded, "\(stop.stdout)\(stop.stderr)")
        #expect(!ProcessStats.isAlive(pid: pid) && UpdateTests.qemuCopies(of: paths.memoryFile).isEmpty)
        #expect(try lab.a.ferry(["vm", "list"]).stdout.contains("no VMs"))
    }
}
