import FerryIO
import Foundation

/// The demo guest (guest/ in the source tree): a Debian cloud kernel and a busybox
/// initramfs with a memory workload that checks itself. Built by guest/build.sh.
public struct GuestImage: Sendable {
    public let directory: String
    public init(directory: String = GuestImage.defaultDirectory) { self.directory = directory }

    /// `FERRY_GUEST_DIR`, or /var/cache/ferry/guest.
    public static var defaultDirectory: String {
        ProcessInfo.processInfo.environment["FERRY_GUEST_DIR"] ?? "/var/cache/ferry/guest"
    }

    public var kernel: String { directory + "/vmlinuz" }
    public var initrd: String { directory + "/initrd.img" }
    public var isBuilt: Bool {
        FileManager.default.fileExists(atPath: kernel) && FileManager.default.fileExists(atPath: initrd)
    }

    /// The guest/ folder with build.sh: `FERRY_GUEST_SRC`, or the source tree this binary
    /// was built from.
    public static func sourceDirectory(filePath: String = #filePath) -> String? {
        if let env = ProcessInfo.processInfo.environment["FERRY_GUEST_SRC"] { return env }
        // <repo>/Sources/FerryVM/GuestImage.swift -> <repo>/guest
        let repo = URL(fileURLWithPath: filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let dir = repo.appendingPathComponent("guest").path
        return FileManager.default.fileExists(atPath: dir + "/build.sh") ? dir : nil
    }

    /// Runs guest/build.sh (cached: it rebuilds only when its inputs change). Its progress
    /// lines go to this process's stdout/stderr.
    public func build() throws {
        guard let source = Self.sourceDirectory() else {
            throw VMError.badInput("cannot find the guest sources (guest/build.sh); set FERRY_GUEST_SRC")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [source + "/build.sh", directory]
        do {
            try process.run()
        } catch {
            throw VMError.io("cannot run guest/build.sh: \(error)")
        }
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw VMError.io("guest build failed (exit \(process.terminationStatus)); see the lines above")
        }
    }

    /// The kernel command line for the demo workload.
    /// `verifyMiBPerSecond` nil verifies continuously (the vCPU never idles).
    public static func append(fillMiB: Int, dirtyMiBPerSecond: Int, fill: String = "random", verifyMiBPerSecond: Int? = nil) -> String {
        "console=ttyS0 panic=-1 ferry.mem=\(fillMiB) ferry.dirty=\(dirtyMiBPerSecond) ferry.fill=\(fill)"
            + (verifyMiBPerSecond.map { " ferry.verify=\($0)" } ?? "")
    }
}
