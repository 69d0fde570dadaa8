import ArgumentParser
import FerryQMP
import Foundation

/// `ferry qmp-relay`: started by `ferry serve` for a postcopy destination's QEMU, never by
/// hand (``QMPRelay``).
struct QMPRelayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qmp-relay",
        abstract: "Holds a QEMU's monitor connection open for `ferry serve` (started by it).",
        shouldDisplay: false)

    @Option(help: "The QEMU's QMP socket.") var qemu: String
    @Option(help: "Where to listen for the one client at a time.") var listen: String

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        // Its own session: a signal to the daemon's process group does not end it.
        _ = setsid()
        let relay = try QMPRelay(qemuSocket: qemu, listenPath: listen)
        relay.run()
        unlink(listen)
    }
}
