import FerryVM

extension VMStore {
    /// The VM `name`, which must run on this host and not be in a migration or update,
    /// with its lock held for the one command that changes it (a migration, an update).
    func claimRunning(_ name: String) throws(ClaimError) -> (VMRecord, VMLock) {
        let record: VMRecord
        do {
            record = try self.record(name)
        } catch {
            throw .store(error)
        }
        guard record.alive else { throw .notRunning(name) }
        guard record.state.phase == .running else { throw .busy(name, record.state.phase) }
        do {
            return (record, try VMLock(paths: record.paths, name: name))
        } catch {
            throw .store(error)
        }
    }
}
