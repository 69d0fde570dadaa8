import FerryIO
import FerryLab
import FerryMigration
import FerryVM
import FerryWire
import Foundation
import Testing

/// A guest-memory directory too small for a VM: `vm run` and an incoming migration are
/// refused up front with a message that says what to do, instead of a QEMU that dies of
/// SIGBUS once the guest fills the directory. Real QEMU (TCG), the real binary, a real
/// 256 MiB tmpfs.
@Suite("Memory room", .serialized, .enabled(if: Env.canRunEndToEnd, "needs root, QEMU and the demo guest (scripts/test.sh)"))
struct MemoryRoomLabTests {
    /// A small tmpfs mounted for one test (before the lab's namespaces copy the mount table).
    final class SmallTmpfs {
        let path: String
        init(size: String) throws {
            path = "/run/ferry-room-\(UUID().uuidString.prefix(8))"
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            try Command.check(["mount", "-t", "tmpfs", "-o", "size=\(size),mode=0700", "tmpfs", path])
        }
        func unmount() {
            if (try? Command.run(["umount", path]))?.succeeded != true { _ = try? Command.run(["umount", "-l", path]) }
            try? FileManager.default.removeItem(atPath: path)
        }
    }

    /// A lab host whose `ferry` keeps guest RAM in `memoryDir`: a wrapper script that sets
    /// FERRY_MEMORY_DIR and execs the real binary (same pid, so `startServe` still works).
    static func host(_ lab: TestLab, _ name: String, memoryDir: String) throws -> LabHost {
        let script = lab.lab.directory + "/ferry-room-\(name)"
        try "#!/bin/sh\nFERRY_MEMORY_DIR=\(memoryDir) exec \(Env.ferry) \"$@\"\n".write(toFile: script, atomically: true, encoding: .utf8)
        chmod(script, 0o755)
        return LabHost(lab: lab.lab, host: name, binary: script)
    }

    /// QEMU processes whose guest RAM is under `dir`.
    static func qemus(under dir: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap(Int32.init).filter { pid in
            ProcessStats.commandLine(pid: pid)?.contains { $0.contains("mem-path=\(dir)/") } ?? false
        }
    }

    /// Files under `dir` and its subdirectories, but not the directory's `state-dir` note.
    static func ramFiles(under dir: String) -> [String] {
        (FileManager.default.enumerator(atPath: dir)?.allObjects as? [String] ?? []).filter { $0.hasSuffix(".ram") }
    }

    static func runArgs(_ name: String, memory: Int) -> [String] {
        ["vm", "run", name, "--memory", "\(memory)M", "--cpus", "1", "--kernel", Env.guest.kernel, "--initrd", Env.guest.initrd,
         "--append", GuestImage.append(fillMiB: 32, dirtyMiBPerSecond: 1)]
    }

    @Test("vm run: too big is refused with the directory, what is free and the fix; one that fits runs with its RAM reserved")
    func vmRun() throws {
        let room = try SmallTmpfs(size: "256m")
        defer { room.unmount() }
        do {
            let lab = try TestLab(nics: 1)
            let b = try Self.host(lab, "b", memoryDir: room.path)

            let big = try b.ferry(Self.runArgs("big", memory: 320))
            #expect(!big.succeeded, "a 320 MiB VM started in a 256 MiB directory")
            let text = big.stdout + big.stderr
            #expect(text.contains("no room for the RAM of VM 'big'"), "\(text)")
            #expect(text.contains(room.path + "/ferry-"), "the message names the directory: \(text)")
            #expect(text.contains("MiB free"), "\(text)")
            #expect(text.contains("mount -o remount,size=") && text.contains("FERRY_MEMORY_DIR"), "\(text)")
            #expect(Self.qemus(under: room.path).isEmpty, "a QEMU was left running")
            #expect(Self.ramFiles(under: room.path).isEmpty, "a RAM file was left: \(Self.ramFiles(under: room.path))")
            #expect((try? b.store.record("big")) == nil, "the refused VM has a record")

            let small = try b.ferry(Self.runArgs("small", memory: 160))
            #expect(small.succeeded, "a 160 MiB VM in a 256 MiB directory: \(small.stderr)")
            let record = try b.store.record("small")
            #expect(record.alive)
            let file = try #require(Self.ramFiles(under: room.path).first.map { room.path + "/" + $0 })
            var st = stat()
            #expect(stat(file, &st) == 0 && UInt64(st.st_blocks) * 512 >= 160 << 20, "the RAM file is reserved up front")
            #expect(VMStore.mapsMemory(pid: record.state.pid, file: file))

            // The room left (under 96 MiB) is counted against the next one.
            let second = try b.ferry(Self.runArgs("second", memory: 128))
            #expect(!second.succeeded && (second.stdout + second.stderr).contains("no room for the RAM of VM 'second'"))
            #expect(Self.qemus(under: room.path) == [record.state.pid])

            // A same-host update maps the same file: no second reservation, not refused.
            let update = try b.ferry(["vm", "update", "small", "--quiet"])
            #expect(update.succeeded, "update in a full directory: \(update.stdout)\(update.stderr)")
            let updated = try b.store.record("small")
            #expect(updated.alive && updated.state.pid != record.state.pid && VMStore.mapsMemory(pid: updated.state.pid, file: file))
            try b.ferry(["vm", "stop", "small"])
            #expect(Self.qemus(under: room.path).isEmpty)
        }
    }

    @Test("a migration into a destination without room is refused before anything moves; the VM keeps running")
    func migrationRefused() throws {
        let room = try SmallTmpfs(size: "256m")
        defer { room.unmount() }
        do {
            let lab = try TestLab(nics: 1)
            let b = try Self.host(lab, "b", memoryDir: room.path)
            let servePID = try b.startServe()
            defer { ProcessStats.terminate(pid: servePID) }
            let vm = try lab.startDemoVM("vm1", on: "a", memory: 320, fill: 64, dirty: 4)

            let (result, report) = try lab.migrate("vm1")
            #expect(result.status == 1, "exit \(result.status): \(result.stdout)\(result.stderr)")
            let r = try #require(report)
            #expect(r.outcome == .failedVMOnSource)
            let error = r.error ?? ""
            #expect(error.contains("no room for the RAM of VM 'vm1'") && error.contains(room.path), "\(error)")
            #expect(error.contains("mount -o remount,size="), "\(error)")
            #expect(r.streamBytes == 0 && r.wireBytes == 0, "bytes moved: \(r.streamBytes) of stream, \(r.wireBytes) on the wire")
            #expect(Self.qemus(under: room.path).isEmpty, "a QEMU was started at the destination")
            #expect(Self.ramFiles(under: room.path).isEmpty)
            lab.expectAbsent("vm1", on: "b")
            let source = try lab.a.store.record("vm1")
            #expect(source.alive && source.state.pid == vm.state.pid && source.state.phase == .running)
            try lab.expectRunningAndHealthy("vm1", on: "a")

            // One that fits goes through into the same directory.
            let fits = try lab.startDemoVM("vm2", on: "a", memory: 192, fill: 64, dirty: 4)
            let (second, secondReport) = try lab.migrate("vm2")
            #expect(second.succeeded, "\(second.stdout)\(second.stderr) \(secondReport?.error ?? "")")
            #expect(!ProcessStats.isAlive(pid: fits.state.pid))
            try lab.expectRunningAndHealthy("vm2", on: "b")
            #expect(Self.qemus(under: room.path).count == 1)
            try b.ferry(["vm", "stop", "vm2"])
        }
    }
}
