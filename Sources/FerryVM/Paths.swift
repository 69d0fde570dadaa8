import Crypto
import Foundation

/// Where a host keeps Ferry's state. One root per host; the lab gives each namespace its own.
///
/// ```
/// <root>/vms/<name>/spec.json      the VM's spec (what any host needs to start it)
///                  /state.json     phase and QEMU pid
///                  /qmp.sock       QEMU's machine protocol
///                  /serial.log     the guest's serial console
///                  /qemu.log       QEMU's own messages
///                  /lock           held while a command changes the VM (flock)
/// <root>/images/<sha256>           boot files, by content
/// <root>/logs/                     serial logs of VMs that stopped or left this host
/// <root>/disks/<name>/diskN.FORMAT  disks copied here by a migration (or `serve --disk-dir`)
///
/// <memory root>/ferry-<hash of root>/<name>.ram   the VM's guest RAM (tmpfs, see below)
/// ```
public struct StatePaths: Sendable {
    public let root: String

    /// The root from `FERRY_STATE_DIR`, or /var/lib/ferry.
    public static var fromEnvironment: StatePaths {
        StatePaths(root: ProcessInfo.processInfo.environment["FERRY_STATE_DIR"] ?? "/var/lib/ferry")
    }

    public init(root: String) { self.root = root }

    public var vmsDirectory: String { root + "/vms" }
    public var imagesDirectory: String { root + "/images" }
    public var logsDirectory: String { root + "/logs" }
    /// Where a migration puts the disks it copies here, unless `ferry serve --disk-dir` says.
    public var disksDirectory: String { root + "/disks" }
    public var runDirectory: String { root + "/run" }
    /// The port this host's `ferry serve` listens on, for migrations from here to name to
    /// the destination (which asks it for the switchover's decision after a crash).
    public var servePortFile: String { runDirectory + "/serve.port" }

    /// Where guest RAM lives: `FERRY_MEMORY_DIR`, or /dev/shm. It must be tmpfs (memory, not
    /// disk), and it is not under the state root because that is usually on disk.
    public static var memoryRoot: String {
        ProcessInfo.processInfo.environment["FERRY_MEMORY_DIR"] ?? "/dev/shm"
    }

    /// This host's directory of guest RAM files: `ferry-` and a hash of the state root, so
    /// that two hosts sharing one /dev/shm (the lab's namespaces) never share a file, and so
    /// that the name stays the same across `ferry serve` restarts (QEMU keeps the file open
    /// and mapped meanwhile; the file outlives any Ferry process).
    public var memoryDirectory: String {
        let absolute = URL(fileURLWithPath: root).standardizedFileURL.path
        let digest = SHA256.hash(data: Data(absolute.utf8)).prefix(8).map { String(format: "%02x", $0) }.joined()
        return Self.memoryRoot + "/ferry-" + digest
    }

    /// The file that holds the VM's guest RAM (a `memory-backend-file` with `share=on`).
    public func memoryFile(_ name: String) -> String { memoryDirectory + "/" + name + ".ram" }

    public func vmDirectory(_ name: String) -> String { vmsDirectory + "/" + name }
    public func image(_ sha256: String) -> String { imagesDirectory + "/" + sha256 }

    public func ensure() throws {
        for dir in [root, vmsDirectory, imagesDirectory, logsDirectory, runDirectory] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
    }
}

/// The files of one VM.
public struct VMPaths: Sendable {
    public let directory: String
    /// The guest RAM, shared by the VM's QEMU and, during a same-host update, its successor.
    public let memoryFile: String

    /// `memoryFile` defaults to a file in `directory` (for QEMUs outside a store, as the
    /// bench's peers; the directory must then be on tmpfs).
    public init(directory: String, memoryFile: String? = nil) {
        self.directory = directory
        self.memoryFile = memoryFile ?? directory + "/memory.ram"
    }
    public var spec: String { directory + "/spec.json" }
    public var state: String { directory + "/state.json" }
    /// `ferry migrate --cancel` asks a `ferry drain` to cancel this VM's migration (and no
    /// other of the drain's) by this file and SIGUSR1.
    public var cancelRequest: String { directory + "/cancel.request" }
    /// `ferry migrate --postcopy-now` asks the `ferry migrate` or `ferry drain` moving this VM
    /// to switch it to postcopy by this file and SIGUSR1; the answer comes back in
    /// ``postcopyAnswer`` (`accepted`, or why not).
    public var postcopyRequest: String { directory + "/postcopy.request" }
    public var postcopyAnswer: String { directory + "/postcopy.answer" }
    public var qmpSocket: String { directory + "/qmp.sock" }
    /// Where the QMP relay of a postcopy destination listens (``QMPRelay``), and its log.
    public var qmpRelaySocket: String { directory + "/qmp-relay.sock" }
    public var qmpRelayLog: String { directory + "/qmp-relay.log" }
    public var serialLog: String { directory + "/serial.log" }
    public var qemuLog: String { directory + "/qemu.log" }
    public var pidFile: String { directory + "/qemu.pid" }
    /// QMP socket and pid file of a second QEMU started for a same-host update, while the
    /// first still holds `qmp.sock`. Each QEMU removes the socket path it bound (and its pid
    /// file) when it exits, so the new one must not bind `qmp.sock`: after the switchover,
    /// `qmp.sock` becomes a symbolic link to the new QEMU's socket (`VMStore.adopt`).
    public func successorQMPSocket(tag: String) -> String { directory + "/qmp-\(tag).sock" }
    public func successorPIDFile(tag: String) -> String { directory + "/qemu-\(tag).pid" }
    /// The Unix socket a same-host update migrates over, QEMU to QEMU.
    public var updateSocket: String { directory + "/update.sock" }
    public var lock: String { directory + "/lock" }
    /// The durable switchover record (``HandoverRecord``).
    public var handover: String { directory + "/handover.json" }
    /// Where the source QEMU connects its migration streams (Ferry listens).
    public var outgoingSocket: String { directory + "/out.sock" }
    /// Where the destination QEMU listens for its migration streams (Ferry connects).
    public var incomingSocket: String { directory + "/in.sock" }
}
