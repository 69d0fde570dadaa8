import ArgumentParser
import Dispatch
import FerryIO
import FerryLibvirt
import FerryMigration
import FerryVM
import Foundation

/// Ctrl-C (SIGINT) and SIGTERM on `ferry migrate`: the first asks the migration to stop,
/// which it does before its commit point (the VM stays here, the report says "cancelled by
/// the operator") and refuses after it. `ferry migrate --cancel` sends SIGTERM.
///
/// Owned by the command's thread, which makes it and releases it (not Sendable); the
/// handlers run on a dispatch queue and touch only the migration, which is.
final class StopSignals {
    private var sources: [DispatchSourceSignal] = []
    private var owner = ThreadOwner()

    init(name: String, migration: SourceMigration) {
        owner.check("StopSignals")
        // `ferry migrate --postcopy-now NAME`: its request file, then SIGUSR1.
        signal(SIGUSR1, SIG_IGN)
        let postcopy = DispatchSource.makeSignalSource(signal: SIGUSR1, queue: .global())
        postcopy.setEventHandler { migration.answerPostcopyRequest() }
        postcopy.resume()
        sources.append(postcopy)
        for number in [SIGINT, SIGTERM] {
            // The default action would end the process mid-migration; dispatch takes the
            // signal instead.
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                let text: String
                switch migration.stop(.cancelled) {
                case .accepted: text = "cancelling the migration of \(name): it rolls back and \(name) keeps running here"
                case .alreadyRequested: text = "already stopping the migration of \(name)"
                case .tooLate: text = "too late to cancel: \(name) is committed to the destination; the migration completes"
                }
                FileHandle.standardError.write(Data(("\nferry migrate: " + text + "\n").utf8))
            }
            source.resume()
            sources.append(source)
        }
    }

    /// Back to the default actions once the migration has ended.
    func release() {
        owner.check("StopSignals")
        for source in sources { source.cancel() }
        sources = []
        signal(SIGINT, SIG_DFL)
        signal(SIGTERM, SIG_DFL)
        signal(SIGUSR1, SIG_DFL)
    }
}

/// `ferry migrate --postcopy-now NAME`: asks the `ferry migrate` or `ferry drain` moving NAME
/// to switch it to postcopy now, and says what it answered.
enum PostcopyNow {
    static func run(name: String, store: VMStore, wait: Duration = .seconds(5)) throws {
        let paths = store.vmPaths(name)
        guard let pid = RunningMigrationFile.runningPID(paths) else {
            throw UserError("no migration of '\(name)' is running on this host")
        }
        try? FileManager.default.removeItem(atPath: paths.postcopyAnswer)
        guard FileManager.default.createFile(atPath: paths.postcopyRequest, contents: Data("\(getpid())\n".utf8)), kill(pid, SIGUSR1) == 0 else {
            throw UserError("cannot ask the migration of \(name) (pid \(pid)) to switch to postcopy: \(errnoDescription(errno))")
        }
        let deadline = ContinuousClock.now + wait
        while ContinuousClock.now < deadline {
            if let answer = try? String(contentsOfFile: paths.postcopyAnswer, encoding: .utf8) {
                try? FileManager.default.removeItem(atPath: paths.postcopyAnswer)
                let text = answer.trimmingCharacters(in: .whitespacesAndNewlines)
                guard text == "accepted" else { throw UserError("the migration of \(name) cannot switch to postcopy: \(text)") }
                print("\(name) switches to postcopy at the migration's next look at QEMU (within a second); its report says when it did")
                return
            }
            usleep(50_000)
        }
        try? FileManager.default.removeItem(atPath: paths.postcopyRequest)
        throw UserError("the migration of \(name) (pid \(pid)) did not answer within \(Int(wait.seconds)) s")
    }
}

/// `ferry migrate --cancel NAME`: finds the `ferry migrate` moving NAME (its pid file in the
/// VM's directory), sends it SIGTERM and waits until it has ended, then says where the VM is.
enum CancelMigration {
    static func run(name: String, store: VMStore, wait: Duration = .seconds(120)) throws {
        let paths = store.vmPaths(name)
        guard let pid = RunningMigrationFile.runningPID(paths) else {
            throw UserError("no migration of '\(name)' is running on this host (nothing to cancel)")
        }
        if ProcessStats.commandLine(pid: pid)?.contains("drain") == true {
            // A drain moves several VMs: it is asked to cancel this one only, and goes on
            // with the others.
            guard FileManager.default.createFile(atPath: paths.cancelRequest, contents: Data("\(getpid())\n".utf8)), kill(pid, SIGUSR1) == 0 else {
                throw UserError("cannot ask ferry drain (pid \(pid)) to cancel \(name): \(errnoDescription(errno))")
            }
            FileHandle.standardError.write(Data("asked ferry drain (pid \(pid)) to cancel the migration of \(name); waiting for it to end\n".utf8))
            let deadline = ContinuousClock.now + wait
            while RunningMigrationFile.runningPID(paths) == pid && ContinuousClock.now < deadline { usleep(100_000) }
            try? FileManager.default.removeItem(atPath: paths.cancelRequest)
            guard RunningMigrationFile.runningPID(paths) != pid else {
                throw UserError("the migration of \(name) in ferry drain (pid \(pid)) is still running after \(Int(wait.seconds)) s; run this again")
            }
        } else {
            try stop(pid: pid, migrationOf: name, wait: wait)
        }
        if let record = try? store.record(name), record.alive, record.state.phase == .running {
            print("cancelled: \(name) keeps running on this host")
            return
        }
        if (try? store.record(name)) == nil {
            print("too late to cancel: the migration of \(name) had passed its commit point and completed; \(name) runs on the destination")
            throw ExitCode(1)
        }
        print("the migration of \(name) has ended; \(name) is not running normally on this host: see `ferry vm list` and the migration's report")
        throw ExitCode(3)
    }

    /// `ferry migrate --cancel DOMAIN --libvirt`: the `ferry migrate --libvirt` of the domain
    /// aborts libvirt's job; libvirt keeps the domain here.
    static func runLibvirt(domain: String, store: VMStore, uri: String, wait: Duration = .seconds(120)) throws {
        let file = LibvirtMigrationFile(runDirectory: store.paths.runDirectory, domain: domain)
        guard let pid = file.runningPID else {
            throw UserError("no libvirt migration of '\(domain)' is running on this host (nothing to cancel)")
        }
        try stop(pid: pid, migrationOf: domain, wait: wait)
        let state = try? Libvirt.load().connect(uri).domain(domain).state()
        if state == .running || state == .paused {
            print("cancelled: \(domain) keeps running on this host")
            return
        }
        print("the migration of \(domain) has ended; libvirt says it is \(state.map { "\($0)" } ?? "not defined") on this host: see the migration's report")
        throw ExitCode(1)
    }

    /// SIGTERM to the `ferry migrate` at `pid` (it cancels, as on Ctrl-C), then waits for it to end.
    private static func stop(pid: Int32, migrationOf name: String, wait: Duration) throws {
        guard kill(pid, SIGTERM) == 0 else {
            throw UserError("cannot signal ferry migrate (pid \(pid)): \(errnoDescription(errno))")
        }
        FileHandle.standardError.write(Data("asked ferry migrate (pid \(pid)) to cancel the migration of \(name); waiting for it to end\n".utf8))
        guard ProcessStats.waitForExit(pid: pid, timeout: wait) else {
            throw UserError("ferry migrate (pid \(pid)) is still running after \(Int(wait.seconds)) s; see its report, or run this again")
        }
    }
}
