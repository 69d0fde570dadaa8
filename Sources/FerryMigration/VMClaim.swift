import FerryVM

extension VMStore {
    /// The VM `name`, which must run on this host and not be in a migration or update,
    /// with its lock held for the one command that changes it (a migration, an update).
    func claimRunning(_ name: String) throws -> (VMRecord, VMLock) {
        let record = try record(name)
        guard record.alive else {
            throw MigrationError(.preparing, "VM '\(name)' is not running on this host (its QEMU is gone)")
        }
        guard record.state.phase == .running else {
            throw MigrationError(.preparing, "VM '\(name)' is \(record.state.phase.rawValue) on this host, not running")
        }
        return (record, try VMLock(paths: record.paths, name: name))
    }
}
