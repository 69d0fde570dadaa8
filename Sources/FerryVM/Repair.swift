import FerryIO
import FerryQMP
import FerryWire
import Foundation

/// `ferry vm repair NAME`: adopts the QEMU that runs a damaged VM again, from what QEMU
/// itself says (its command line, `query-status`) and what is still readable. The rules
/// are pure (facts in, a repair or a refusal out); ``VMStore/repair(_:dropHandover:)``
/// gathers the facts and writes the files.
///
/// What it never does: guess a switchover's decision. A damaged `handover.json` is dropped
/// only when the operator says so (`--drop-handover`) and QEMU runs the guest; a paused
/// copy with a lost record is left for `ferry vm stop` (docs/ARCHITECTURE.md, "Damaged
/// state files").
public enum VMRepairRules {
    public enum Handover: Sendable, Equatable {
        case none
        case valid(HandoverRecord)
        case damaged
    }

    public struct Facts: Sendable, Equatable {
        public var name: String
        /// spec.json and state.json, if readable.
        public var spec: VMSpec?
        public var state: VMState?
        public var handover: Handover = .none
        /// The QEMUs that run the VM (by their command lines).
        public var qemus: [Int32] = []
        /// What the one QEMU says over QMP; nil if it did not answer (`statusError`: why).
        public var status: QEMURunStatus?
        public var statusError: String?
        /// The spec rebuilt from that QEMU's command line; nil if it cannot be
        /// (`commandLineProblem`: why).
        public var commandLineSpec: VMSpec?
        public var commandLineProblem: String?
        /// The QEMU binary it runs, if not the default one.
        public var binary: String?
        public var dropHandover = false

        public init(name: String) { self.name = name }
    }

    public struct Repair: Sendable, Equatable {
        public var spec: VMSpec
        public var state: VMState
        public var writeSpec = false
        public var writeState = false
        public var removeHandover = false
        /// What it does, one line each (empty: nothing to repair).
        public var notes: [String] = []
    }

    public enum Decision: Sendable, Equatable {
        case repair(Repair)
        case refuse(String)
    }

    public static func decide(_ f: Facts, now: Date = Date()) -> Decision {
        let name = f.name
        guard let pid = f.qemus.first else {
            return .refuse("no QEMU of \(name) runs on this host: nothing to adopt; `ferry vm stop \(name)` removes what is left")
        }
        guard f.qemus.count == 1 else {
            let pids = f.qemus.map(String.init).joined(separator: ", ")
            return .refuse("QEMUs \(pids) all run \(name): Ferry cannot tell which holds the guest; `ferry vm stop \(name)` stops them all")
        }
        guard let status = f.status else {
            return .refuse("QEMU pid \(pid) of \(name) does not answer over QMP (\(f.statusError ?? "no answer")): `ferry vm stop \(name)` stops it")
        }

        // The spec: what QEMU runs wins over a readable spec.json that says otherwise.
        var notes: [String] = []
        let spec: VMSpec
        var writeSpec = false
        switch (f.spec, f.commandLineSpec) {
        case (let readable?, let running?):
            if sameHardware(readable, running) {
                spec = readable
            } else {
                spec = named(running, like: readable)
                writeSpec = true
                notes.append("spec.json said other than QEMU runs: rewritten from QEMU's command line")
            }
        case (nil, let running?):
            spec = running
            writeSpec = true
            notes.append("spec.json rewritten from QEMU pid \(pid)'s command line")
        case (let readable?, nil):
            spec = readable
        case (nil, nil):
            return .refuse("spec.json of \(name) is damaged and QEMU's command line does not give the whole spec (\(f.commandLineProblem ?? "unknown")); `ferry vm stop \(name)` stops it")
        }

        // The switchover record: never guessed.
        var handover: HandoverRecord?
        var removeHandover = false
        switch f.handover {
        case .none: break
        case .valid(let record): handover = record
        case .damaged:
            guard f.dropHandover else {
                return .refuse("handover.json of \(name) is damaged: a switchover's decision may be lost. Check that the peer host holds no copy of \(name) waiting for it (`ferry vm list` there), then `ferry vm repair \(name) --drop-handover`; or `ferry vm stop \(name)`")
            }
            guard status == .running else {
                return .refuse("handover.json of \(name) is damaged and its QEMU is \(status): whether this copy may run was the switchover's decision, which is lost; `ferry vm stop \(name)` discards it (do so only if the VM runs on the peer)")
            }
            removeHandover = true
            notes.append("handover.json dropped (kept as handover.json.damaged-*): QEMU runs the guest here")
        }

        // The state: kept if readable (its pid set to the QEMU found), else rebuilt.
        var state: VMState
        var writeState = false
        if let readable = f.state {
            state = readable
            if state.pid != pid {
                notes.append("state.json named pid \(state.pid): now QEMU pid \(pid)")
                state.pid = pid
                writeState = true
            }
            if removeHandover && state.phase != .running {
                // The guest runs here and no record says otherwise: a reconciler must not
                // settle it as a half-done migration.
                state.phase = .running
                state.update = nil
                writeState = true
            }
        } else {
            state = VMState(phase: phase(status: status, handover: handover), pid: pid, startedAt: now)
            state.qemuBinary = f.binary
            writeState = true
            notes.append("state.json rebuilt: pid \(pid), phase \(state.phase.rawValue) (QEMU is \(status))")
        }
        return .repair(Repair(spec: spec, state: state, writeSpec: writeSpec, writeState: writeState,
                              removeHandover: removeHandover, notes: notes))
    }

    /// The phase of a VM whose state is lost, from its QEMU's status and its handover
    /// record: what a reconciler then settles as it would after a crash.
    public static func phase(status: QEMURunStatus, handover: HandoverRecord?) -> VMPhase {
        if let handover { return handover.role == .source ? .migratingOut : .incoming }
        switch status {
        case .inmigrate, .prelaunch: return .incoming  // never loaded (no record): discarded
        case .finishMigrate, .postmigrate: return .migratingOut  // never committed: rolled back
        default: return .running
        }
    }

    /// The same hardware and boot, whatever the boot files are called.
    static func sameHardware(_ a: VMSpec, _ b: VMSpec) -> Bool {
        named(b, like: a) == a
    }

    /// `spec` with the boot file names of `other` where the contents are the same.
    static func named(_ spec: VMSpec, like other: VMSpec) -> VMSpec {
        var spec = spec
        if let kernel = spec.kernel, kernel.sha256 == other.kernel?.sha256 { spec.kernel?.name = other.kernel!.name }
        if let initrd = spec.initrd, let old = other.initrd, initrd.sha256 == old.sha256 { spec.initrd?.name = old.name }
        return spec
    }
}

extension VMStore {
    /// Adopts the QEMU that runs VM `name` again (``VMRepairRules``). Returns what it did.
    public func repair(_ name: String, dropHandover: Bool = false) throws(VMError) -> [String] {
        if let problem = VMSpec.validateName(name) { throw VMError.badInput(problem) }
        let vm = vmPaths(name)
        let found = qemus(of: name)
        guard !found.isEmpty || FileManager.default.fileExists(atPath: vm.directory) else { throw VMError.notFound(name) }
        if !found.isEmpty {
            try? FileManager.default.createDirectory(atPath: vm.directory, withIntermediateDirectories: true)
        }
        let lock = try VMLock(paths: vm, name: name)
        defer { withExtendedLifetime(lock) {} }

        var facts = VMRepairRules.Facts(name: name)
        facts.spec = StateFileCoding.load(.spec, at: vm.spec) { data throws(StateFileProblem) in try StateFileCoding.decodeSpec(data, vm: name) }.value
        facts.state = StateFileCoding.load(.state, at: vm.state, StateFileCoding.decodeState).value
        switch loadHandover(name) {
        case .absent: facts.handover = .none
        case .valid(let record): facts.handover = .valid(record)
        case .damaged: facts.handover = .damaged
        }
        facts.qemus = found.map(\.pid)
        facts.dropHandover = dropHandover
        if found.count == 1, let line = found.first?.commandLine {
            do {
                let qmp = try QMPClient(path: line.qmpSocket ?? vm.qmpSocket, timeout: .seconds(3))
                defer { qmp.close() }
                facts.status = try qmp.queryStatus().status
            } catch {
                facts.statusError = "\(error)"
            }
            do {
                facts.commandLineSpec = try specOf(line)
            } catch {
                facts.commandLineProblem = error.description
            }
            if line.binary != QEMU.binary { facts.binary = line.binary }
        }

        switch VMRepairRules.decide(facts) {
        case .refuse(let why):
            throw VMError.damaged(name, why)
        case .repair(let repair):
            do {
                if repair.writeSpec { try write(repair.spec, to: vm.spec) }
                if repair.removeHandover {
                    let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(of: ":", with: "")
                    guard rename(vm.handover, vm.handover + ".damaged-\(stamp)") == 0 || errno == ENOENT else {
                        throw VMError.io("cannot move \(vm.handover) aside: \(String(cString: strerror(errno)))")
                    }
                    Self.syncDirectory(of: vm.handover)
                }
                if repair.writeState { try write(repair.state, to: vm.state) }
                if let socket = found.first?.commandLine.qmpSocket, socket != vm.qmpSocket,
                   !FileManager.default.fileExists(atPath: vm.qmpSocket) {
                    // A successor of a same-host update: qmp.sock leads to its socket (`adopt`).
                    _ = symlink((socket as NSString).lastPathComponent, vm.qmpSocket)
                }
            } catch let error as VMError {
                throw error
            } catch {
                throw VMError.io("cannot write the repaired files of \(name): \(error)")
            }
            return repair.notes
        }
    }

    /// The spec the QEMU of `line` runs, its boot files found in the store by hash.
    func specOf(_ line: QEMUCommandLine) throws(VMError) -> VMSpec {
        // No -kernel: a VM that boots from its first disk.
        let kernel = try line.kernel.map { path throws(VMError) in try storedBootFile(path, name: "kernel") }
        let initrd = try line.initrd.map { path throws(VMError) in try storedBootFile(path, name: "initrd") }
        guard var spec = line.spec(kernel: kernel, initrd: initrd) else {
            throw VMError.badInput("its command line lacks one of -m, -smp, -accel, -machine, -cpu, -append")
        }
        // The disks' sizes are the images' own (read while QEMU holds them).
        for i in spec.disks.indices {
            do {
                spec.disks[i].virtualSizeBytes = try DiskImage.inspect(path: spec.disks[i].path, format: spec.disks[i].format).1
            } catch {
                throw VMError.badInput("its disk \(spec.disks[i].path): \(error)")
            }
        }
        if let problem = StateFileCoding.check(spec, vm: line.name) { throw VMError.badInput("the spec it gives \(problem)") }
        return spec
    }

    /// The boot file at `path`, which must be in this store's images/ under its hash.
    func storedBootFile(_ path: String, name: String) throws(VMError) -> BootFile {
        let sha = (path as NSString).lastPathComponent
        guard StateFileCoding.isSHA256(sha),
              QEMUCommandLine.canonical(path) == QEMUCommandLine.canonical(paths.image(sha)),
              let size = (try? FileManager.default.attributesOfItem(atPath: paths.image(sha)))?[.size] as? NSNumber else {
            throw VMError.badInput("its \(name) \(path) is not in the boot-file store")
        }
        return BootFile(name: name, byteCount: size.int64Value, sha256: sha)
    }
}
