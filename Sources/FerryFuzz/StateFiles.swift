import FerryVM
import FerryWire
import Foundation

/// One fuzz input through the reader of every state file a host keeps (spec.json,
/// state.json, handover.json, run/incoming.json: ``StateFileCoding``), whole and after its
/// first byte (which picks one reader, as ``FrameFuzzing/typedPayload(_:)`` picks a frame
/// type, so that mutations of one seed stay with its reader).
///
/// A reader may refuse any input, but must not crash, and what it accepts must be a record
/// it could have written: it keeps its rules, survives encoding and decoding unchanged, and
/// a spec gives a QEMU command line that reads back as the same spec (what `ferry vm repair`
/// rebuilds a spec from).
enum StateFileFuzzing {
    static let vm = "demo"

    static func run(_ bytes: [UInt8]) {
        let data = Data(bytes)
        spec(data)
        state(data)
        handover(data)
        incoming(data)
        guard let first = bytes.first else { return }
        let rest = Data(bytes.dropFirst())
        switch first % 4 {
        case 0: spec(rest)
        case 1: state(rest)
        case 2: handover(rest)
        default: incoming(rest)
        }
    }

    static func spec(_ data: Data) {
        guard let spec = try? StateFileCoding.decodeSpec(data, vm: vm) else { return }
        precondition(spec.name == vm, "a spec of another VM was accepted")
        precondition(StateFileCoding.check(spec, vm: vm) == nil, "an accepted spec breaks its rules")
        precondition(roundTrip(spec) { data throws(StateFileProblem) in try StateFileCoding.decodeSpec(data, vm: vm) } == spec, "a spec does not survive re-encoding")
        commandLine(spec)
    }

    static func state(_ data: Data) {
        guard let state = try? StateFileCoding.decodeState(data) else { return }
        precondition(state.pid > 0, "a state with pid \(state.pid) was accepted")
        precondition(StateFileCoding.check(state) == nil, "an accepted state breaks its rules")
        precondition(roundTrip(state, StateFileCoding.decodeState) == state, "a state does not survive re-encoding")
    }

    static func handover(_ data: Data) {
        guard let record = try? StateFileCoding.decodeHandover(data) else { return }
        precondition(StateFileCoding.check(record) == nil, "an accepted handover record breaks its rules")
        precondition(roundTrip(record, StateFileCoding.decodeHandover) == record, "a handover record does not survive re-encoding")
    }

    static func incoming(_ data: Data) {
        guard let incoming = try? StateFileCoding.decodeIncoming(data) else { return }
        precondition(StateFileCoding.check(incoming) == nil, "an accepted incoming.json breaks its rules")
        precondition(roundTrip(incoming, StateFileCoding.decodeIncoming) == incoming, "incoming.json does not survive re-encoding")
    }

    /// Encodes `value` as the store writes it and reads it back.
    static func roundTrip<T: Encodable>(_ value: T, _ decode: (Data) throws(StateFileProblem) -> T) -> T? {
        guard let data = try? StateFileCoding.encode(value) else { return nil }
        return try? decode(data)
    }

    /// The QEMU command line of an accepted spec reads back as that spec.
    static func commandLine(_ spec: VMSpec) {
        let paths = StatePaths(root: "/var/lib/ferry-fuzz")
        let store = VMStore(paths: paths)
        let vmPaths = store.vmPaths(spec.name)
        let argv = QEMU.arguments(spec: spec, paths: vmPaths, store: store.bootFiles, incoming: false)
        guard let line = QEMUCommandLine(argv) else { preconditionFailure("the command line of a valid spec is not Ferry's QEMU") }
        precondition(line.runs(spec.name, at: vmPaths), "the command line of a valid spec does not run its VM")
        precondition(!line.runs(spec.name, at: VMStore(paths: StatePaths(root: "/var/lib/ferry-other")).vmPaths(spec.name)),
                     "the command line of a VM matches another host's VM of that name")
        precondition(line.kernel == spec.kernel.map { paths.image($0.sha256) } && line.initrd == spec.initrd.map { paths.image($0.sha256) },
                     "the boot files do not read back")
        precondition(line.spec(kernel: spec.kernel, initrd: spec.initrd) == spec, "the command line of a valid spec reads back as another spec")
    }

    static var seeds: [(String, [UInt8])] {
        let sha = Seeds.sha
        let at = Date(timeIntervalSince1970: 1_700_000_000)
        var state = VMState(phase: .updating, pid: 4242, startedAt: at, migratedFrom: "a")
        state.update = UpdateInProgress(tag: "update-1", binary: "/usr/bin/qemu-system-x86_64", wasRunning: true)
        state.session = Fixtures.session
        let entry = IncomingMigrations.Entry(session: Fixtures.session, vm: "demo", source: "10.0.0.1", since: at, admittedAt: at)
        let queued = IncomingMigrations.Entry(session: String(Fixtures.session.reversed()), vm: "other", source: "10.0.0.2", since: at)
        let values: [(String, UInt8, Data?)] = [
            ("spec", 0, try? StateFileCoding.encode(VMSpec(name: vm, memoryMiB: 256, cpus: 2,
                                                           kernel: BootFile(name: "vmlinuz", byteCount: 8_000_000, sha256: sha),
                                                           initrd: nil, append: "console=ttyS0, ferry.fill=64", accelerator: .tcg,
                                                           machine: "pc-i440fx-7.2", cpuModel: "qemu64", ramPadKiB: 8))),
            ("state", 1, try? StateFileCoding.encode(state)),
            ("handover", 2, try? StateFileCoding.encode(HandoverRecord(session: Fixtures.session, role: .destination, decision: .prepared,
                                                                       peerHost: "fd00::1", peerPort: 7470, at: at))),
            ("incoming", 3, try? StateFileCoding.encode(IncomingMigrations(pid: 77, limit: 2, running: [entry], queued: [queued], updatedAt: at))),
        ]
        return values.compactMap { name, selector, data in
            data.map { (name, [selector] + Array($0)) }
        } + [("spec-whole", Array((try? StateFileCoding.encode(Seeds.spec)) ?? Data()))]
    }
}
