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
    public var runDirectory: String { root + "/run" }

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
    public init(directory: String) { self.directory = directory }
    public var spec: String { directory + "/spec.json" }
    public var state: String { directory + "/state.json" }
    public var qmpSocket: String { directory + "/qmp.sock" }
    public var serialLog: String { directory + "/serial.log" }
    public var qemuLog: String { directory + "/qemu.log" }
    public var pidFile: String { directory + "/qemu.pid" }
    public var lock: String { directory + "/lock" }
    /// Where the source QEMU connects its migration streams (Ferry listens).
    public var outgoingSocket: String { directory + "/out.sock" }
    /// Where the destination QEMU listens for its migration streams (Ferry connects).
    public var incomingSocket: String { directory + "/in.sock" }
}
