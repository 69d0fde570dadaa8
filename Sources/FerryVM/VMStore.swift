import FerryIO
import FerryQMP
import FerryWire
import Foundation

/// Where a VM is in its life on this host.
public enum VMPhase: String, Codable, Sendable {
    /// QEMU runs the VM here.
    case running
    /// A destination QEMU waits for (or is receiving) a migration; not the VM's home yet.
    case incoming
    /// The VM is being migrated away; it still runs here until the switchover.
    case migratingOut = "migrating-out"
    /// A same-host update is moving the VM to a new QEMU on this host; it runs on the old
    /// one until the switchover.
    case updating
}

/// What a host records about a VM besides its spec.
public struct VMState: Codable, Sendable, Equatable {
    public var phase: VMPhase
    public var pid: Int32
    public var startedAt: Date
    /// The host it came from, for VMs that arrived by migration.
    public var migratedFrom: String?
    /// The QEMU binary it runs under, when a same-host update chose one (nil: the default).
    public var qemuBinary: String?
    /// When its latest same-host update switched it to a new QEMU.
    public var updatedAt: Date?
    /// The migration session it arrived by, so that a source settling that session after
    /// a crash can be told it runs here.
    public var session: String?
    /// A same-host update under way (phase `updating`): where its new QEMU is, so that
    /// the update can be settled if `ferry vm update` dies half-way.
    public var update: UpdateInProgress?

    public init(phase: VMPhase, pid: Int32, startedAt: Date = Date(), migratedFrom: String? = nil) {
        self.phase = phase
        self.pid = pid
        self.startedAt = startedAt
        self.migratedFrom = migratedFrom
    }
}

/// A same-host update under way, written before its new QEMU starts.
public struct UpdateInProgress: Codable, Sendable, Equatable {
    /// Names the new QEMU's QMP socket and pid file (``QEMUInstance/successor(_:binary:tag:)``).
    public var tag: String
    public var binary: String
    /// Whether the guest ran before the update (the old QEMU's `cont` on a rollback).
    public var wasRunning: Bool
    public init(tag: String, binary: String, wasRunning: Bool) {
        self.tag = tag
        self.binary = binary
        self.wasRunning = wasRunning
    }
}

/// A VM as `ferry vm list` shows it.
public struct VMRecord: Sendable {
    public var spec: VMSpec
    public var state: VMState
    /// True if its QEMU process exists (and is this VM's).
    public var alive: Bool
    public var paths: VMPaths
}

/// The VMs of this host, kept in the state directory.
public struct VMStore: Sendable {
    public let paths: StatePaths
    public var bootFiles: BootFileStore { BootFileStore(paths: paths) }

    public init(paths: StatePaths = .fromEnvironment) { self.paths = paths }

    public func vmPaths(_ name: String) -> VMPaths {
        VMPaths(directory: paths.vmDirectory(name), memoryFile: paths.memoryFile(name))
    }

    /// Creates the VM's directory and starts QEMU. The directory is removed if QEMU fails.
    /// The VM's NICs get new taps: on their bridges and up for a VM that runs here now,
    /// down and on no bridge for an incoming one (``GuestNICs``, until its commit).
    public func start(spec: VMSpec, incoming: Bool, migratedFrom: String? = nil) throws -> (VMRecord, QMPClient) {
        if let problem = VMSpec.validateName(spec.name) { throw VMError.badInput(problem) }
        try paths.ensure()
        let vm = vmPaths(spec.name)
        // A QEMU of this name runs here whatever its files say (damaged ones included).
        if !qemus(of: spec.name).isEmpty { throw VMError.exists(spec.name) }
        if FileManager.default.fileExists(atPath: vm.directory) {
            if let existing = try? record(spec.name), existing.alive { throw VMError.exists(spec.name) }
            archiveAndRemove(spec.name, reason: "replaced")
        }
        try FileManager.default.createDirectory(atPath: vm.directory, withIntermediateDirectories: true)
        do {
            try prepareMemoryDirectory()
            // A new VM (or one arriving over the network) starts from fresh RAM: a file left
            // by a VM of the same name that died is not this VM's memory. No QEMU of this
            // host can be using it: the VM's own QEMU is not alive (checked above).
            try? FileManager.default.removeItem(atPath: vm.memoryFile)
            // All of it reserved before QEMU maps it, or a guest that fills a full
            // directory dies of SIGBUS (MemoryRoom.swift).
            try reserveMemory(for: spec, file: vm.memoryFile)
            try write(spec, to: vm.spec)
            let taps = try TapSet.create(spec.nics)
            defer { taps.close() }
            if !incoming { try GuestNICs.connect(spec.nics) }
            let (pid, qmp) = try QEMU.launch(spec: spec, paths: vm, store: bootFiles, incoming: incoming, taps: taps)
            let state = VMState(phase: incoming ? .incoming : .running, pid: pid, migratedFrom: migratedFrom)
            try write(state, to: vm.state)
            return (VMRecord(spec: spec, state: state, alive: true, paths: vm), qmp)
        } catch {
            try? FileManager.default.removeItem(atPath: vm.directory)
            try? FileManager.default.removeItem(atPath: vm.memoryFile)
            throw error
        }
    }

    /// Creates this host's guest-RAM directory and checks that it is memory (tmpfs or
    /// hugetlbfs): guest RAM in a file on disk would page to disk.
    public func prepareMemoryDirectory() throws {
        let dir = paths.memoryDirectory
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw VMError.io("cannot create the guest memory directory \(dir): \(error); set FERRY_MEMORY_DIR to a tmpfs directory")
        }
        let type = Self.fileSystemType(of: dir)
        guard type == "tmpfs" || type == "hugetlbfs" else {
            throw VMError.badInput("the guest memory directory \(dir) is not on tmpfs (guest RAM would live on disk); set FERRY_MEMORY_DIR to a tmpfs directory such as /dev/shm")
        }
        // Which state root the directory belongs to, for an operator looking at /dev/shm.
        let owner = dir + "/state-dir"
        if !FileManager.default.fileExists(atPath: owner) {
            try? (paths.root + "\n").write(toFile: owner, atomically: true, encoding: .utf8)
        }
    }

    /// The type of the file system holding `path` (the longest mount point above it in
    /// /proc/mounts), e.g. "tmpfs"; nil if unknown.
    public static func fileSystemType(of path: String) -> String? {
        guard let mounts = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return nil }
        let real = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        var best: (length: Int, type: String)?
        for line in mounts.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count >= 3 else { continue }
            let point = fields[1].replacingOccurrences(of: "\\040", with: " ")
            let under = point == "/" || real == point || real.hasPrefix(point + "/")
            if under && point.count >= (best?.length ?? -1) { best = (point.count, String(fields[2])) }
        }
        return best?.type
    }

    /// True if process `pid` has the VM's guest RAM file mapped (and the file is still the
    /// one on disk, not deleted): the condition for a same-host update to keep the memory.
    public static func mapsMemory(pid: Int32, file: String) -> Bool {
        guard let maps = try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8) else { return false }
        return maps.split(separator: "\n").contains { $0.hasSuffix(" " + file) }
    }

    /// After a same-host update: the VM now runs in `pid`, reached at `qmpSocket`.
    ///
    /// `qmp.sock` becomes a symbolic link to the new QEMU's own socket (connect follows it),
    /// so every command keeps using `qmp.sock`. The old QEMU must have exited first: a QEMU
    /// unlinks the path it bound its socket to when it quits, and that path is `qmp.sock`
    /// for a VM's first QEMU.
    public func adopt(_ name: String, pid: Int32, qmpSocket: String, binary: String?) throws {
        let vm = vmPaths(name)
        let link = vm.qmpSocket + ".new"
        try? FileManager.default.removeItem(atPath: link)
        guard symlink((qmpSocket as NSString).lastPathComponent, link) == 0, rename(link, vm.qmpSocket) == 0 else {
            throw VMError.io("cannot point \(vm.qmpSocket) at \(qmpSocket): \(String(cString: strerror(errno)))")
        }
        var state = try read(VMState.self, from: vm.state)
        state.phase = .running
        state.pid = pid
        state.qemuBinary = binary
        state.updatedAt = Date()
        state.update = nil
        try write(state, to: vm.state)
    }

    public func record(_ name: String) throws(VMError) -> VMRecord {
        if let problem = VMSpec.validateName(name) { throw VMError.badInput(problem) }
        let vm = vmPaths(name)
        let spec = StateFileCoding.load(.spec, at: vm.spec) { data throws(StateFileProblem) in try StateFileCoding.decodeSpec(data, vm: name) }
        let state = StateFileCoding.load(.state, at: vm.state, StateFileCoding.decodeState)
        guard let spec = spec.value, let state = state.value else {
            let damage = [spec.damage, state.damage].compactMap { $0 }
            if damage.isEmpty && !FileManager.default.fileExists(atPath: vm.directory) { throw VMError.notFound(name) }
            throw VMError.damaged(name, damage.isEmpty ? "its spec.json or state.json is missing" : damage.map(\.description).joined(separator: "; "))
        }
        return VMRecord(spec: spec, state: state, alive: ownsQEMU(pid: state.pid, name: name), paths: vm)
    }

    public func list() -> [VMRecord] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: paths.vmsDirectory)) ?? []
        return names.sorted().compactMap { try? record($0) }
    }

    public func setState(_ name: String, _ state: VMState) throws {
        try write(state, to: vmPaths(name).state)
    }

    /// Moves the VM to `phase`, keeping the rest of its state; with `from`, only if it is
    /// in that phase now (a rollback must not undo what someone else already settled).
    /// Leaving `updating` forgets the update's record. `session`: the migration session the
    /// VM now runs by (``VMState/session``).
    public func setPhase(_ name: String, _ phase: VMPhase, from: VMPhase? = nil, session: String? = nil) throws {
        var state = try record(name).state
        if let from, state.phase != from { return }
        state.phase = phase
        if phase != .updating { state.update = nil }
        if let session { state.session = session }
        try setState(name, state)
    }

    /// Marks the VM `updating` with where its new QEMU will be, before that QEMU starts.
    public func beginUpdate(_ name: String, _ update: UpdateInProgress) throws {
        var state = try record(name).state
        state.phase = .updating
        state.update = update
        try setState(name, state)
    }

    /// Stops the VM's QEMU (QMP quit, then signals) and removes the VM from this host,
    /// keeping its serial log under logs/. Every QEMU of the VM goes, the one its state
    /// names and any other its command line shows to be the VM's (``qemus(of:among:)``): a
    /// VM with damaged files can be stopped.
    public func stop(_ name: String, reason: String = "stopped") throws {
        if let problem = VMSpec.validateName(name) { throw VMError.badInput(problem) }
        let vm = vmPaths(name)
        var targets = qemus(of: name).map { (pid: $0.pid, qmpSocket: $0.commandLine.qmpSocket ?? vm.qmpSocket) }
        if let rec = try? record(name), rec.alive, !targets.contains(where: { $0.pid == rec.state.pid }) {
            targets.append((rec.state.pid, vm.qmpSocket))
        }
        if targets.isEmpty && !FileManager.default.fileExists(atPath: vm.directory) { throw VMError.notFound(name) }
        for target in targets where !QEMU.stop(pid: target.pid, qmpSocket: target.qmpSocket) {
            throw VMError.qemu("QEMU of '\(name)' (pid \(target.pid)) does not exit")
        }
        archiveAndRemove(name, reason: reason)
    }

    /// Unlinks the guest RAM file of a VM whose QEMU is about to be stopped for good (its
    /// memory has moved to another host). The pages stay while that QEMU maps them and go
    /// when it exits: freeing a VM's memory is then part of its QEMU's exit, not work Ferry
    /// does (unlinking a file of gigabytes that nothing maps frees every page right there).
    public func releaseMemory(_ name: String) {
        _ = unlink(vmPaths(name).memoryFile)
    }

    /// Moves the serial log to logs/ and deletes the VM's directory and its guest RAM file.
    /// The RAM file stays if the VM's recorded QEMU is still alive (it would be the last
    /// copy of the guest's memory for a later update).
    public func archiveAndRemove(_ name: String, reason: String) {
        let vm = vmPaths(name)
        if let state = try? read(VMState.self, from: vm.state), Self.isQEMU(pid: state.pid, name: name) {
            // Never pull the memory from under a running QEMU.
        } else if !qemus(of: name).isEmpty {
            // Nor from under one the VM's files no longer name.
        } else {
            try? FileManager.default.removeItem(atPath: vm.memoryFile)
        }
        if reason.hasPrefix(Self.incomingDiscard) { removeCopiedDisks(name) }
        let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(of: ":", with: "")
        try? FileManager.default.createDirectory(atPath: paths.logsDirectory, withIntermediateDirectories: true)
        _ = rename(vm.serialLog, paths.logsDirectory + "/\(name)-\(stamp)-\(reason).log")
        try? FileManager.default.removeItem(atPath: vm.directory)
    }

    /// The prefix of the reasons an incoming copy is discarded for, one that never ran here
    /// (its source keeps the VM): `incoming-aborted`, `incoming-died`, ...
    public static let incomingDiscard = "incoming-"

    /// An incoming copy that never ran is discarded: so are the images its disks were
    /// copied into (every disk of its spec that is not shared is an image its migration
    /// created here; a shared one is the source's own and stays). Their directory goes too
    /// once empty. Never for a VM that ran here: its images are its disks.
    private func removeCopiedDisks(_ name: String) {
        guard let spec = try? read(VMSpec.self, from: vmPaths(name).spec) else { return }
        for disk in spec.disks where !disk.shared {
            try? FileManager.default.removeItem(atPath: disk.path)
            let directory = (disk.path as NSString).deletingLastPathComponent
            if (try? FileManager.default.contentsOfDirectory(atPath: directory))?.isEmpty == true {
                try? FileManager.default.removeItem(atPath: directory)
            }
        }
    }

    /// True if `pid` is a QEMU running a VM called `name` (guards against pid reuse), from
    /// any state root: ``ownsQEMU(pid:name:)`` checks it is this store's.
    public static func isQEMU(pid: Int32, name: String) -> Bool {
        guard ProcessStats.isAlive(pid: pid), let argv = ProcessStats.commandLine(pid: pid) else { return false }
        return argv.contains("guest=\(name),debug-threads=on")
    }

    // MARK: JSON files

    /// Writes `value` as JSON through a temporary file and a rename; `durably`: fsync of
    /// the file and its directory too (``writeDurably(_:to:)``).
    func write<T: Encodable>(_ value: T, to path: String, durably: Bool = false) throws {
        let data = try StateFileCoding.encode(value)
        if durably { return try Self.writeDurably(data, to: path) }
        let tmp = path + ".tmp"
        try data.write(to: URL(fileURLWithPath: tmp))
        guard rename(tmp, path) == 0 else { throw VMError.io("cannot write \(path)") }
    }

    /// Reads a JSON file as `type`, without the rules of ``StateFileCoding`` (which the
    /// readers of spec, state and handover go through).
    func read<T: Decodable>(_ type: T.Type, from path: String) throws -> T {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try decoder.decode(T.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
    }
}

/// An exclusive lock on one VM (flock on its lock file), held while a command changes it,
/// so that two migrations of the same VM cannot run at once.
public final class VMLock {
    private let fd: Int32
    public convenience init(paths: VMPaths, name: String) throws(VMError) {
        try self.init(path: paths.lock, what: "VM '\(name)'")
    }

    /// An exclusive lock on the file at `path` (made if need be), or `busy` at once if
    /// another process holds it; `what` names the locked thing in the errors.
    public init(path: String, what: String) throws(VMError) {
        fd = open(path, O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw VMError.io("cannot open lock for \(what)") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw VMError.busy("\(what) is busy: another ferry command (a migration?) holds it")
        }
    }
    deinit {
        flock(fd, LOCK_UN)
        close(fd)
    }
}
