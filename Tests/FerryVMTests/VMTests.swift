import FerryIO
import Foundation
import Testing
@testable import FerryVM
@testable import FerryWire

@Suite("VM specs, boot files, state")
struct VMTests {
    func tempStore() throws -> VMStore {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-vm-\(UUID().uuidString.prefix(8))").path
        let paths = StatePaths(root: root)
        try paths.ensure()
        return VMStore(paths: paths)
    }

    @Test("boot files are stored by content and received only with the right hash")
    func bootFiles() throws {
        let store = try tempStore()
        let src = store.paths.root + "/kernel"
        let bytes = (0..<3_000_000).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        try Data(bytes).write(to: URL(fileURLWithPath: src))
        let file = try store.bootFiles.importFile(at: src)
        #expect(file.byteCount == 3_000_000 && file.sha256.count == 64)
        #expect(store.bootFiles.has(file))

        // A second host receives it in pieces.
        let other = try tempStore()
        #expect(!other.bootFiles.has(file))
        let receiver = try BootFileReceiver(file: file, store: other.bootFiles)
        try receiver.append(offset: 0, bytes: Array(bytes[0..<1_000_000]))
        #expect(throws: VMError.self) { try receiver.append(offset: 5, bytes: [1]) }  // a gap
        try receiver.append(offset: 1_000_000, bytes: Array(bytes[1_000_000...]))
        #expect(other.bootFiles.has(file))

        // A piece with the wrong content fails the hash and stores nothing.
        let third = try tempStore()
        let bad = try BootFileReceiver(file: file, store: third.bootFiles)
        var wrong = bytes
        wrong[10] ^= 1
        #expect(throws: VMError.self) { try bad.append(offset: 0, bytes: wrong) }
        #expect(!third.bootFiles.has(file))
        #expect(throws: VMError.self) { try bad.append(offset: 3_000_000, bytes: [1]) }
    }

    /// A 384 MiB TCG guest with the 8 KiB pad of QEMU before 9.0.
    static let paddedTCGSpec = VMSpec(name: "v", memoryMiB: 384, cpus: 2,
                                      kernel: BootFile(name: "k", byteCount: 1, sha256: String(repeating: "a", count: 64)),
                                      initrd: nil, append: "console=ttyS0", accelerator: .tcg, machine: "pc-i440fx-7.2",
                                      cpuModel: "qemu64", ramPadKiB: 8)

    @Test("QEMU's command line follows the spec; incoming VMs wait paused")
    func arguments() throws {
        let store = try tempStore()
        let spec = Self.paddedTCGSpec
        let argv = QEMU.arguments(spec: spec, paths: store.vmPaths("v"), store: store.bootFiles, incoming: true)
        let joined = argv.joined(separator: " ")
        #expect(joined.contains("-m 393224k"))
        #expect(joined.contains("-machine pc-i440fx-7.2"))
        #expect(joined.contains("-accel tcg"))
        #expect(joined.contains("-S -incoming defer"))
        #expect(joined.contains("-daemonize"))
        #expect(!QEMU.arguments(spec: spec, paths: store.vmPaths("v"), store: store.bootFiles, incoming: false).contains("-incoming"))
    }

    @Test("guest RAM is a shared file backend of exactly -m's size, pad included")
    func memoryBackend() throws {
        let store = try tempStore()
        let spec = Self.paddedTCGSpec
        let paths = store.vmPaths("v")
        let argv = QEMU.arguments(spec: spec, paths: paths, store: store.bootFiles, incoming: false)
        func value(after flag: String) -> String? { argv.firstIndex(of: flag).map { argv[$0 + 1] } }
        #expect(value(after: "-object") == "memory-backend-file,id=ferry-ram,size=393224k,mem-path=\(paths.memoryFile),share=on")
        #expect(value(after: "-machine") == "pc-i440fx-7.2,memory-backend=ferry-ram")
        #expect(value(after: "-m") == "393224k")
        #expect(paths.memoryFile == store.paths.memoryDirectory + "/v.ram")
        #expect(QEMU.optionValue("/a,b") == "/a,,b")

        // A successor for a same-host update: same RAM file and serial log, its own binary,
        // QMP socket and pid file, waiting paused for the migration.
        let next = QEMUInstance.successor(paths, binary: "/opt/qemu/bin/qemu-system-x86_64", tag: "abc123")
        let argv2 = QEMU.arguments(spec: spec, paths: paths, store: store.bootFiles, incoming: true, instance: next)
        #expect(argv2.first == "/opt/qemu/bin/qemu-system-x86_64")
        #expect(argv2.contains("unix:\(paths.directory)/qmp-abc123.sock,server=on,wait=off"))
        #expect(argv2.contains(paths.directory + "/qemu-abc123.pid"))
        #expect(!argv2.contains("unix:\(paths.qmpSocket),server=on,wait=off"))
        #expect(argv2.contains { $0.contains("mem-path=\(paths.memoryFile),share=on") })
        #expect(argv2.joined(separator: " ").hasSuffix("-S -incoming defer"))
    }

    @Test("each state root has its own RAM directory, the same every time, on tmpfs by default")
    func memoryDirectories() throws {
        let a = StatePaths(root: "/run/ferry-lab/x/a"), b = StatePaths(root: "/run/ferry-lab/x/b")
        #expect(a.memoryDirectory != b.memoryDirectory)
        #expect(a.memoryDirectory == StatePaths(root: "/run/ferry-lab/x/a/").memoryDirectory)
        #expect(a.memoryDirectory == StatePaths(root: "/run/ferry-lab/x/./a").memoryDirectory)
        #expect(a.memoryFile("vm1") != b.memoryFile("vm1"))
        #expect(a.memoryDirectory.hasPrefix(StatePaths.memoryRoot + "/ferry-"))
        if FileManager.default.fileExists(atPath: "/dev/shm") {
            #expect(VMStore.fileSystemType(of: "/dev/shm/anything") == "tmpfs")
        }
        #expect(VMStore.fileSystemType(of: "/proc/self") == "proc")
    }

    @Test("the TCG dirty-tracking pad applies to TCG under QEMU before 9 only")
    func pad() {
        #expect(QEMU.tcgDirtyTrackingPadKiB(accelerator: .tcg, qemuVersion: "7.2.22") == 8)
        #expect(QEMU.tcgDirtyTrackingPadKiB(accelerator: .tcg, qemuVersion: "9.0.0") == 0)
        #expect(QEMU.tcgDirtyTrackingPadKiB(accelerator: .kvm, qemuVersion: "7.2.22") == 0)
    }

    @Test("a spec written before ramPadKiB existed still reads")
    func specCompatibility() throws {
        let json = #"{"name":"v","memoryMiB":64,"cpus":1,"kernel":{"name":"k","byteCount":1,"sha256":"aa"},"append":"","accelerator":"tcg","machine":"pc","cpuModel":"qemu64"}"#
        let spec = try JSONDecoder().decode(VMSpec.self, from: Data(json.utf8))
        #expect(spec.ramPadKiB == 0 && spec.initrd == nil)
    }

    @Test("a VM whose QEMU is gone is listed as not alive; unknown names are clear errors")
    func listing() throws {
        let store = try tempStore()
        let kernel = BootFile(name: "k", byteCount: 1, sha256: String(repeating: "a", count: 64))
        let spec = VMSpec(name: "ghost", memoryMiB: 64, cpus: 1, kernel: kernel, initrd: nil, append: "",
                          accelerator: .tcg, machine: "pc", cpuModel: "qemu64")
        try FileManager.default.createDirectory(atPath: store.paths.vmDirectory("ghost"), withIntermediateDirectories: true)
        try store.write(spec, to: store.vmPaths("ghost").spec)
        try store.write(VMState(phase: .running, pid: getpid()), to: store.vmPaths("ghost").state)
        let record = try store.record("ghost")
        #expect(!record.alive, "our own pid is not a QEMU running 'ghost'")
        #expect(store.list().map(\.spec.name) == ["ghost"])
        #expect(throws: VMError.self) { try store.record("nope") }
        #expect(throws: VMError.self) { try store.record("../etc") }
        store.archiveAndRemove("ghost", reason: "test")
        #expect(store.list().isEmpty)
    }

    @Test("a serial log with CR LF line ends yields every heartbeat, the last one last")
    func crlf() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("crlf-\(UUID().uuidString.prefix(8)).log").path
        let text = (1...5).map { "FERRY-HB seq=\($0) ms=\($0 * 100) errors=0 status=OK\r\n" }.joined()
        try Data(("[ 0.1] boot\r\n" + text).utf8).write(to: URL(fileURLWithPath: path))
        let console = GuestConsole(path: path)
        #expect(console.heartbeats.map(\.sequence) == [1, 2, 3, 4, 5])
        #expect(console.lastHeartbeat?.sequence == 5)
    }

    @Test("heartbeat lines parse; FAIL and errors are not OK")
    func heartbeats() {
        let ok = Heartbeat(line: "FERRY-HB seq=12 ms=1200 mem_mib=64 gen=5 checked=100 passes=3 errors=0 status=OK")
        #expect(ok?.sequence == 12 && ok?.ok == true && ok?.passes == 3)
        #expect(Heartbeat(line: "FERRY-HB seq=13 ms=1300 errors=1 status=FAIL")?.ok == false)
        #expect(Heartbeat(line: "[    1.0] random kernel line") == nil)
        #expect(Heartbeat(line: "FERRY-HB ms=1") == nil)
    }

    @Test("a VM lock is exclusive")
    func lock() throws {
        let store = try tempStore()
        let paths = store.vmPaths("x")
        try FileManager.default.createDirectory(atPath: paths.directory, withIntermediateDirectories: true)
        let first = try VMLock(paths: paths, name: "x")
        // flock is per open file description: a second open in this process conflicts too.
        #expect(throws: VMError.self) { try VMLock(paths: paths, name: "x") }
        _ = first
    }
}

@Suite("Heartbeat watcher")
struct HeartbeatWatcherTests {
    @Test("measures the largest gap between heartbeats across two logs, by the host's clock")
    func gap() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hbw-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let a = dir + "/a.log", b = dir + "/b.log"
        _ = FileManager.default.createFile(atPath: a, contents: Data("FERRY-HB seq=1 ms=0 errors=0 status=OK\n".utf8))
        let watcher = HeartbeatWatcher(paths: [a])
        watcher.add(path: b)
        let ha = try FileHandle(forWritingTo: URL(fileURLWithPath: a))
        ha.seekToEndOfFile()
        for seq in 2...4 {
            ha.write(Data("FERRY-HB seq=\(seq) ms=\(seq * 100) errors=0 status=OK\r\n".utf8))
            Thread.sleep(forTimeInterval: 0.1)
        }
        ha.write(Data("FERRY-HB seq=5 ms=5".utf8))  // the switchover cuts this line...
        Thread.sleep(forTimeInterval: 0.4)  // the "migration": no heartbeat anywhere
        _ = FileManager.default.createFile(atPath: b, contents: Data("00 errors=0 status=OK\r\n".utf8))  // ...b finishes it
        Thread.sleep(forTimeInterval: 0.1)
        let hb = try FileHandle(forWritingTo: URL(fileURLWithPath: b))
        hb.seekToEndOfFile()
        hb.write(Data("FERRY-HB seq=6 ms=600 errors=0 status=OK\r\n".utf8))
        Thread.sleep(forTimeInterval: 0.1)
        watcher.stop()
        #expect(watcher.heartbeatCount == 5, "seq 2...6 are new, 5 across both logs")
        #expect(watcher.lastSeq == 6)
        #expect(watcher.largestGapSeconds > 0.4 && watcher.largestGapSeconds < 0.9, "gap \(watcher.largestGapSeconds)")
        #expect(!watcher.sawErrors)
        #expect(watcher.skippedSequences == 0)
    }
}
