import FerryWire
import Foundation

/// A VM whose files cannot all be trusted, as `ferry vm list` shows it: what is damaged,
/// what is still readable, and the QEMUs that run it (found by their command lines).
public struct DamagedVM: Sendable {
    public var name: String
    public var paths: VMPaths
    /// What is wrong, one line each (a damaged or missing file, a pid that is not its QEMU).
    public var problems: [String]
    /// What is still readable.
    public var spec: VMSpec?
    public var state: VMState?
    public var qemus: [QEMUProcess]
    /// Its handover record is damaged: a switchover's decision may be lost.
    public var handoverDamaged: Bool

    /// What the operator can do about it.
    public var advice: String {
        if qemus.isEmpty {
            return "no QEMU of it runs: `ferry vm stop \(name)` removes what is left (its console log is kept)"
        }
        let pids = qemus.map { "\($0.pid)" }.joined(separator: ", ")
        if handoverDamaged {
            return "QEMU pid \(pids) runs it; its switchover record is lost: check the peer host first, then "
                + "`ferry vm repair \(name) --drop-handover` adopts it again if the guest runs, or `ferry vm stop \(name)` stops it"
        }
        return "QEMU pid \(pids) runs it: `ferry vm repair \(name)` adopts it again, `ferry vm stop \(name)` stops it"
    }
}

/// One VM of the host, readable or not.
public enum VMEntry: Sendable {
    case healthy(VMRecord)
    case damaged(DamagedVM)

    /// Its state in a word, as `ferry status` and the metrics give it: its phase while its
    /// QEMU lives, else `dead`; `damaged` when its files are.
    public var stateName: String {
        switch self {
        case .healthy(let record): record.alive ? record.state.phase.rawValue : "dead"
        case .damaged: "damaged"
        }
    }

    public var name: String {
        switch self {
        case .healthy(let record): record.spec.name
        case .damaged(let vm): vm.name
        }
    }
}

extension VMStore {
    /// Every VM of this host, damaged ones included: each directory under vms/, and each
    /// QEMU of this store whose directory is gone. One scan of /proc for all.
    public func entries() -> [VMEntry] {
        let processes = QEMUProcess.scan()
        let directories = ((try? FileManager.default.contentsOfDirectory(atPath: paths.vmsDirectory)) ?? [])
            .filter { VMSpec.validateName($0) == nil }
        let names = Set(directories).union(namesRun(among: processes))
        return names.sorted().map { inspect($0, among: processes) }
    }

    /// The VM `name` as ``entries()`` shows it; nil if nothing of it is here.
    public func entry(_ name: String) -> VMEntry? {
        guard VMSpec.validateName(name) == nil else { return nil }
        let processes = QEMUProcess.scan()
        if !FileManager.default.fileExists(atPath: vmPaths(name).directory) && qemus(of: name, among: processes).isEmpty {
            return nil
        }
        return inspect(name, among: processes)
    }

    func inspect(_ name: String, among processes: [QEMUProcess]) -> VMEntry {
        let vm = vmPaths(name)
        let qemus = self.qemus(of: name, among: processes)
        let spec = StateFileCoding.load(.spec, at: vm.spec) { data throws(StateFileProblem) in try StateFileCoding.decodeSpec(data, vm: name) }
        let state = StateFileCoding.load(.state, at: vm.state, StateFileCoding.decodeState)
        let handover = loadHandover(name)
        var problems: [String] = []
        if !FileManager.default.fileExists(atPath: vm.directory) { problems.append("its directory \(vm.directory) is gone") }
        for damage in [spec.damage, state.damage, handover.damage].compactMap({ $0 }) { problems.append(damage.description) }
        if case .absent = spec { problems.append("spec.json is missing") }
        if case .absent = state { problems.append("state.json is missing") }
        if let s = state.value {
            let alive = qemus.contains { $0.pid == s.pid }
            if !alive, let other = qemus.first {
                problems.append("state.json names pid \(s.pid), which is not its QEMU; QEMU pid \(other.pid) runs it")
            } else if s.phase != .updating, let other = qemus.first(where: { $0.pid != s.pid }) {
                problems.append("a second QEMU of it runs (pid \(other.pid)) beside pid \(s.pid)")
            }
        }
        if problems.isEmpty, let s = spec.value, let st = state.value {
            return .healthy(VMRecord(spec: s, state: st, alive: qemus.contains { $0.pid == st.pid }, paths: vm))
        }
        return .damaged(DamagedVM(name: name, paths: vm, problems: problems, spec: spec.value, state: state.value,
                                  qemus: qemus, handoverDamaged: handover.damage != nil))
    }
}
