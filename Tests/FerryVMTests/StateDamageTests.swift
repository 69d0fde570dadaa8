import FerryIO
import FerryQMP
import Foundation
import Testing
@testable import FerryVM
@testable import FerryWire

/// Issue 18: damaged state files. The readers on every way a file can be bad, the matching
/// of a running QEMU to its VM on this state root only, and the repair rules.
@Suite("Damaged state files", .serialized)
struct StateDamageTests {
    static let sha = String(repeating: "ab", count: 32)
    static let spec = VMSpec(name: "vm1", memoryMiB: 256, cpus: 2, kernel: BootFile(name: "vmlinuz", byteCount: 10, sha256: sha),
                             initrd: BootFile(name: "initrd.img", byteCount: 20, sha256: String(sha.reversed())),
                             append: "console=ttyS0, ferry.mem=64 -m 1k", accelerator: .tcg, machine: "pc-i440fx-7.2",
                             cpuModel: "qemu64", ramPadKiB: 8)
    static let at = Date(timeIntervalSince1970: 1_700_000_000)

    static func json(_ value: some Encodable) -> Data { try! StateFileCoding.encode(value) }

    static func edited(_ value: some Encodable, _ change: (inout [String: Any]) -> Void) -> Data {
        var object = try! JSONSerialization.jsonObject(with: json(value)) as! [String: Any]
        change(&object)
        return try! JSONSerialization.data(withJSONObject: object)
    }

    // MARK: Readers

    @Test("what the store writes reads back as itself")
    func roundTrips() throws {
        #expect(try StateFileCoding.decodeSpec(Self.json(Self.spec), vm: "vm1") == Self.spec)
        var state = VMState(phase: .updating, pid: 42, startedAt: Self.at, migratedFrom: "a")
        state.update = UpdateInProgress(tag: "t1", binary: "/usr/bin/qemu", wasRunning: true)
        #expect(try StateFileCoding.decodeState(Self.json(state)) == state)
        let handover = HandoverRecord(session: "0f0f", role: .destination, decision: .prepared, peerHost: "10.0.0.1", peerPort: 7470, at: Self.at)
        #expect(try StateFileCoding.decodeHandover(Self.json(handover)) == handover)
        let incoming = IncomingMigrations(pid: 9, limit: 2, running: [.init(session: "s", vm: "vm1", source: "a", since: Self.at, admittedAt: Self.at)],
                                          queued: [.init(session: "t", vm: "vm2", source: "a", since: Self.at)], updatedAt: Self.at)
        #expect(try StateFileCoding.decodeIncoming(Self.json(incoming)) == incoming)
    }

    static let badSpecs: [(String, Data)] = [
        ("empty", Data()),
        ("not JSON", Data("garbage{".utf8)),
        ("truncated", json(spec).prefix(40)),
        ("an array", Data("[1,2]".utf8)),
        ("a key missing", edited(spec) { $0["cpus"] = nil }),
        ("a wrong type", edited(spec) { $0["memoryMiB"] = "lots" }),
        ("another VM's", edited(spec) { $0["name"] = "vm2" }),
        ("a bad name", edited(spec) { $0["name"] = "../vm1" }),
        ("no memory", edited(spec) { $0["memoryMiB"] = 0 }),
        ("no vCPU", edited(spec) { $0["cpus"] = 0 }),
        ("a pad of a MiB", edited(spec) { $0["ramPadKiB"] = 1024 }),
        ("an option smuggled into the machine", edited(spec) { $0["machine"] = "pc,accel=kvm" }),
        ("a short hash", edited(spec) { $0["kernel"] = ["name": "k", "byteCount": 1, "sha256": "ab"] }),
        ("too large", Data(repeating: 0x20, count: StateFileCoding.maximumByteCount + 1)),
    ]

    @Test("a damaged spec.json is refused, with why", arguments: badSpecs.indices)
    func badSpec(_ index: Int) {
        let (what, data) = Self.badSpecs[index]
        #expect(throws: StateFileProblem.self, "\(what)") { try StateFileCoding.decodeSpec(data, vm: "vm1") }
    }

    @Test("damaged state, handover and incoming files are refused")
    func badRecords() {
        let state = VMState(phase: .running, pid: 42, startedAt: Self.at)
        for data in [Data("{".utf8), Self.edited(state) { $0["pid"] = 0 }, Self.edited(state) { $0["phase"] = "flying" },
                     Self.edited(state) { $0["startedAt"] = "yesterday" }, Self.edited(state) { $0["startedAt"] = "0001-01-01T00:00:00Z" },
                     Self.edited(state) { $0["update"] = ["tag": "t", "binary": "q", "wasRunning": true] }] {
            #expect(throws: StateFileProblem.self) { try StateFileCoding.decodeState(data) }
        }
        let handover = HandoverRecord(session: "s1", role: .source, decision: .commit, peerHost: "b", peerPort: 7470, at: Self.at)
        for data in [Data("null".utf8), Self.edited(handover) { $0["decision"] = "prepared" }, Self.edited(handover) { $0["peerPort"] = 0 },
                     Self.edited(handover) { $0["session"] = "" }, Self.edited(handover) { $0["role"] = "bystander" }] {
            #expect(throws: StateFileProblem.self) { try StateFileCoding.decodeHandover(data) }
        }
        let entry = IncomingMigrations.Entry(session: "s", vm: "vm1", source: "a", since: Self.at)
        for incoming in [IncomingMigrations(pid: 0, limit: 1, running: [], queued: [], updatedAt: Self.at),
                         IncomingMigrations(pid: 5, limit: 0, running: [], queued: [], updatedAt: Self.at),
                         IncomingMigrations(pid: 5, limit: 1, running: [entry], queued: [], updatedAt: Self.at)] {
            #expect(throws: StateFileProblem.self) { try StateFileCoding.decodeIncoming(Self.json(incoming)) }
        }
        #expect(throws: StateFileProblem.self) { try StateFileCoding.decodeIncoming(Data("{\"pid\":".utf8)) }
    }

    @Test("ferry status's reader: absent, damaged with why, valid")
    func incomingFile() throws {
        let store = try VMTests().tempStore()
        let run = store.paths.runDirectory
        guard case .absent = IncomingMigrations.load(runDirectory: run) else { Issue.record("no file must read as absent"); return }
        try Data("not json".utf8).write(to: URL(fileURLWithPath: IncomingMigrations.path(runDirectory: run)))
        let damage = try #require(IncomingMigrations.load(runDirectory: run).damage)
        #expect(damage.file == .incoming && damage.problem == "is not JSON")
        IncomingMigrations(pid: 3, limit: 2, running: [], queued: [], updatedAt: Date()).write(runDirectory: run)
        #expect(IncomingMigrations.load(runDirectory: run).value?.pid == 3)
    }

    // MARK: Finding QEMUs

    @Test("a QEMU command line reads back as its spec and matches only its own state root")
    func commandLine() throws {
        let store = try VMTests().tempStore()
        let other = try VMTests().tempStore()
        let argv = QEMU.arguments(spec: Self.spec, paths: store.vmPaths("vm1"), store: store.bootFiles, incoming: true)
        let line = try #require(QEMUCommandLine(argv))
        #expect(line.name == "vm1" && line.incoming)
        #expect(line.qmpSocket == store.vmPaths("vm1").qmpSocket && line.pidFile == store.vmPaths("vm1").pidFile)
        #expect(line.memoryFile == store.vmPaths("vm1").memoryFile)
        #expect(line.spec(kernel: Self.spec.kernel, initrd: Self.spec.initrd) == Self.spec)
        #expect(line.runs("vm1", at: store.vmPaths("vm1")))
        #expect(!line.runs("vm1", at: other.vmPaths("vm1")), "another host's VM of the same name")
        #expect(!line.runs("vm2", at: store.vmPaths("vm2")))
        #expect(QEMUCommandLine(["sleep", "10"]) == nil)
    }

    @Test("a discarded incoming copy takes the images its disks were copied into with it; a shared image, and any VM's that ran here, stay")
    func discardedCopyRemovesItsImages() throws {
        let store = try VMTests().tempStore()
        let copy = store.paths.disksDirectory + "/vm1/disk0.qcow2", shared = store.paths.root + "/shared.raw"
        try FileManager.default.createDirectory(atPath: (copy as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        for path in [copy, shared] { try Data("image".utf8).write(to: URL(fileURLWithPath: path)) }
        var spec = Self.spec
        spec.disks = [DiskSpec(path: copy, format: .qcow2, virtualSizeBytes: 1 << 20, shared: false),
                      DiskSpec(path: shared, format: .raw, virtualSizeBytes: 1 << 20, shared: true)]
        for (reason, kept) in [("stopped", true), ("died", true), ("incoming-aborted", false)] {
            try FileManager.default.createDirectory(atPath: store.vmPaths("vm1").directory, withIntermediateDirectories: true)
            try store.write(spec, to: store.vmPaths("vm1").spec)
            store.archiveAndRemove("vm1", reason: reason)
            #expect(FileManager.default.fileExists(atPath: copy) == kept, "\(reason)")
            #expect(FileManager.default.fileExists(atPath: shared), "\(reason): the shared image must stay")
        }
        #expect(!FileManager.default.fileExists(atPath: store.paths.disksDirectory + "/vm1"), "its emptied directory goes too")
    }

    @Test("a VM's disks read back from its QEMU command line: paths (commas too), formats, shared or not, in order")
    func commandLineDisks() throws {
        let store = try VMTests().tempStore()
        var spec = Self.spec
        spec.disks = [DiskSpec(path: "/srv/a,b/vm1.qcow2", format: .qcow2, virtualSizeBytes: 1 << 30, shared: false),
                      DiskSpec(path: "/nfs/vm1-data.raw", format: .raw, virtualSizeBytes: 1 << 20, shared: true)]
        let argv = QEMU.arguments(spec: spec, paths: store.vmPaths("vm1"), store: store.bootFiles, incoming: false)
        #expect(argv.contains("virtio-blk-pci,drive=disk1,id=vd1,iothread=disk1-io") && argv.contains("iothread,id=disk1-io"))
        let line = try #require(QEMUCommandLine(argv))
        // The sizes are the images' (read by `ferry vm repair`), not on the command line.
        #expect(line.disks == spec.disks.map { DiskSpec(path: $0.path, format: $0.format, virtualSizeBytes: 0, shared: $0.shared) })
        #expect(DiskSpec.guestName(0) == "vda" && DiskSpec.guestName(25) == "vdz" && DiskSpec.guestName(26) == "vdaa")
        var bad = spec
        bad.disks[0].path = "relative.qcow2"
        #expect(StateFileCoding.check(bad, vm: "vm1") != nil)
        #expect(StateFileCoding.check(spec, vm: "vm1") == nil)
        // Something to boot: a kernel, or else the first disk (the fuzzer found a spec with
        // neither, its "kernel" key mangled, which read back as another spec).
        var diskBoot = spec
        diskBoot.kernel = nil
        diskBoot.initrd = nil
        diskBoot.append = ""
        #expect(StateFileCoding.check(diskBoot, vm: "vm1") == nil)
        let bootLine = try #require(QEMUCommandLine(QEMU.arguments(spec: diskBoot, paths: store.vmPaths("vm1"), store: store.bootFiles, incoming: false)))
        #expect(bootLine.kernel == nil && bootLine.spec(kernel: nil, initrd: nil)?.disks.count == 2)
        var nothing = diskBoot
        nothing.disks = []
        #expect(StateFileCoding.check(nothing, vm: "vm1") == "has nothing to boot: no kernel and no disk")
        diskBoot.append = "console=ttyS0"
        #expect(StateFileCoding.check(diskBoot, vm: "vm1") != nil)
    }

    /// A process whose command line is the QEMU command line of `name` on `store`: a shell
    /// that waits on its stdin with the builtin `read`, with those words as its arguments.
    /// (It once ran `sleep`: the shell's child carries the shell's command line between its
    /// fork and its exec, and a scan in that instant found two "QEMUs".)
    static func fakeQEMU(_ store: VMStore, _ name: String) throws -> Int32 {
        var spec = Self.spec
        spec.name = name
        let argv = QEMU.arguments(spec: spec, paths: store.vmPaths(name), store: store.bootFiles, incoming: false)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "read -r line; true"] + argv
        process.standardInput = Pipe()
        try process.run()
        let pid = process.processIdentifier
        let deadline = ContinuousClock.now + .seconds(5)
        while ContinuousClock.now < deadline && !store.ownsQEMU(pid: pid, name: name) { usleep(10_000) }
        return pid
    }

    @Test("a running QEMU is found whatever its files say; start refuses a second, list says damaged, stop stops it")
    func damagedRunningVM() throws {
        let store = try VMTests().tempStore()
        let other = try VMTests().tempStore()
        let pid = try Self.fakeQEMU(store, "vm1")
        defer { ProcessStats.terminate(pid: pid, grace: .milliseconds(100)) }
        #expect(store.qemus(of: "vm1").map(\.pid) == [pid])
        #expect(other.qemus(of: "vm1").isEmpty, "another state root's VM of that name is not this one")
        #expect(store.ownsQEMU(pid: pid, name: "vm1") && !other.ownsQEMU(pid: pid, name: "vm1"))

        // Healthy first.
        let vm = store.vmPaths("vm1")
        try FileManager.default.createDirectory(atPath: vm.directory, withIntermediateDirectories: true)
        try store.write(Self.spec, to: vm.spec)
        try store.write(VMState(phase: .running, pid: pid), to: vm.state)
        #expect(try store.record("vm1").alive)
        guard case .healthy? = store.entry("vm1") else { Issue.record("a VM with good files is healthy"); return }

        // Each file damaged in turn.
        for file in [vm.state, vm.spec, vm.handover] {
            let good = FileManager.default.contents(atPath: file)
            try Data("}{".utf8).write(to: URL(fileURLWithPath: file))
            guard case .damaged(let damaged)? = store.entries().first else { Issue.record("\(file): not listed as damaged"); return }
            #expect(damaged.qemus.map(\.pid) == [pid])
            #expect(damaged.problems.contains { $0.contains("is not JSON") }, "\(damaged.problems)")
            #expect(damaged.advice.contains("ferry vm repair vm1"))
            #expect(throws: VMError.self) { _ = try store.start(spec: Self.spec, incoming: false) }
            #expect(ProcessStats.isAlive(pid: pid) && FileManager.default.fileExists(atPath: vm.directory), "start must not touch it")
            if file == vm.handover {
                #expect(damaged.handoverDamaged && (try? store.readHandover("vm1")) == nil)
                try FileManager.default.removeItem(atPath: file)
            } else {
                #expect(throws: VMError.self) { try store.record("vm1") }
                try good!.write(to: URL(fileURLWithPath: file))
            }
        }

        // Its directory gone altogether: still found, still refused, still listed.
        try FileManager.default.removeItem(atPath: vm.directory)
        #expect(store.entries().map(\.name) == ["vm1"])
        #expect(throws: VMError.self) { _ = try store.start(spec: Self.spec, incoming: false) }

        // Stop finds it by its command line (no QMP socket: signals).
        try store.stop("vm1")
        #expect(!ProcessStats.isAlive(pid: pid))
        #expect(store.entries().isEmpty)
        #expect(throws: VMError.self) { try store.stop("vm1") }
    }

    @Test("a state.json naming another pid than the QEMU that runs the VM is damaged")
    func wrongPID() throws {
        let store = try VMTests().tempStore()
        let pid = try Self.fakeQEMU(store, "vm1")
        defer { ProcessStats.terminate(pid: pid, grace: .milliseconds(100)) }
        let vm = store.vmPaths("vm1")
        try FileManager.default.createDirectory(atPath: vm.directory, withIntermediateDirectories: true)
        try store.write(Self.spec, to: vm.spec)
        try store.write(VMState(phase: .running, pid: getpid()), to: vm.state)
        guard case .damaged(let damaged)? = store.entry("vm1") else { Issue.record("not damaged"); return }
        #expect(damaged.problems == ["state.json names pid \(getpid()), which is not its QEMU; QEMU pid \(pid) runs it"])
    }

    // MARK: Repair rules

    static func facts(_ change: (inout VMRepairRules.Facts) -> Void) -> VMRepairRules.Facts {
        var facts = VMRepairRules.Facts(name: "vm1")
        facts.qemus = [77]
        facts.status = .running
        facts.commandLineSpec = spec
        change(&facts)
        return facts
    }

    @Test("repair: what it adopts, what it refuses")
    func repairRules() throws {
        func repair(_ facts: VMRepairRules.Facts) -> VMRepairRules.Repair? {
            if case .repair(let r) = VMRepairRules.decide(facts, now: Self.at) { return r }
            return nil
        }
        func refusal(_ facts: VMRepairRules.Facts) -> String? {
            if case .refuse(let why) = VMRepairRules.decide(facts, now: Self.at) { return why }
            return nil
        }
        // Both files lost, the guest runs: both rebuilt, phase running.
        let both = try #require(repair(Self.facts { _ in }))
        #expect(both.writeSpec && both.writeState && !both.removeHandover)
        #expect(both.spec == Self.spec && both.state == VMState(phase: .running, pid: 77, startedAt: Self.at))
        // spec.json readable, other boot file names: kept as it is.
        var renamed = Self.spec
        renamed.kernel?.name = "bzImage"
        let kept = try #require(repair(Self.facts { $0.spec = renamed; $0.state = VMState(phase: .running, pid: 77, startedAt: Self.at) }))
        #expect(!kept.writeSpec && !kept.writeState && kept.notes.isEmpty && kept.spec.kernel?.name == "bzImage")
        // A readable spec.json that says other than QEMU runs: QEMU wins.
        var stale = Self.spec
        stale.cpus = 8
        #expect(repair(Self.facts { $0.spec = stale })?.spec == Self.spec)
        // A readable state with another pid: the pid is corrected, the rest kept.
        let moved = try #require(repair(Self.facts { $0.state = VMState(phase: .running, pid: 5, startedAt: Self.at, migratedFrom: "b") }))
        #expect(moved.writeState && moved.state.pid == 77 && moved.state.migratedFrom == "b")
        // The state lost: the phase from QEMU's status and the handover record.
        #expect(VMRepairRules.phase(status: .postmigrate, handover: nil) == .migratingOut)
        #expect(VMRepairRules.phase(status: .inmigrate, handover: nil) == .incoming)
        #expect(VMRepairRules.phase(status: .paused, handover: nil) == .running)
        let commit = HandoverRecord(session: "s1", role: .source, decision: .commit, peerHost: "b", peerPort: 7470, at: Self.at)
        #expect(VMRepairRules.phase(status: .postmigrate, handover: commit) == .migratingOut)
        #expect(repair(Self.facts { $0.status = .paused; $0.handover = .valid(commit) })?.state.phase == .migratingOut)

        // Refusals.
        #expect(refusal(Self.facts { $0.qemus = [] })?.contains("no QEMU") == true)
        #expect(refusal(Self.facts { $0.qemus = [77, 78] })?.contains("77, 78") == true)
        #expect(refusal(Self.facts { $0.status = nil; $0.statusError = "refused" })?.contains("does not answer") == true)
        #expect(refusal(Self.facts { $0.commandLineSpec = nil; $0.commandLineProblem = "no -kernel" })?.contains("no -kernel") == true)
        // A lost switchover decision is never guessed.
        #expect(refusal(Self.facts { $0.handover = .damaged })?.contains("--drop-handover") == true)
        #expect(refusal(Self.facts { $0.handover = .damaged; $0.dropHandover = true; $0.status = .postmigrate })?.contains("ferry vm stop") == true)
        let dropped = try #require(repair(Self.facts {
            $0.handover = .damaged; $0.dropHandover = true; $0.spec = Self.spec
            $0.state = VMState(phase: .incoming, pid: 77, startedAt: Self.at)
        }))
        #expect(dropped.removeHandover && dropped.state.phase == .running, "the guest runs here: no reconciler may discard it")
    }
}
