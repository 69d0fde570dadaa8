import Crypto
import FerryWire
import Foundation

/// Content-addressed store of boot files (kernels, initrds), so that a VM's files stay
/// available for as long as the VM lives, and a destination that already has a file
/// is not sent it again.
public struct BootFileStore: Sendable {
    public let paths: StatePaths
    public init(paths: StatePaths) { self.paths = paths }

    /// Hashes `path` and copies it into the store (if it is not there yet).
    public func importFile(at path: String) throws -> BootFile {
        guard FileManager.default.isReadableFile(atPath: path) else {
            throw VMError.badInput("cannot read boot file '\(path)'")
        }
        let (sha, size) = try Self.sha256(ofFile: path)
        let dest = paths.image(sha)
        if !FileManager.default.fileExists(atPath: dest) {
            try paths.ensure()
            let tmp = dest + ".tmp-\(getpid())"
            try? FileManager.default.removeItem(atPath: tmp)
            try FileManager.default.copyItem(atPath: path, toPath: tmp)
            _ = rename(tmp, dest)
        }
        return BootFile(name: (path as NSString).lastPathComponent, byteCount: size, sha256: sha)
    }

    /// True if the store holds a file with this hash (and the right size).
    public func has(_ file: BootFile) -> Bool {
        let attrs = try? FileManager.default.attributesOfItem(atPath: paths.image(file.sha256))
        return (attrs?[.size] as? NSNumber)?.int64Value == file.byteCount
    }

    public func path(of file: BootFile) -> String { paths.image(file.sha256) }

    public static func sha256(ofFile path: String) throws -> (String, Int64) {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw VMError.badInput("cannot open '\(path)'")
        }
        defer { try? handle.close() }
        var hasher = SHA256()
        var size: Int64 = 0
        while let data = try handle.read(upToCount: 1 << 20), !data.isEmpty {
            hasher.update(data: data)
            size += Int64(data.count)
        }
        return (Hex.encode(Array(hasher.finalize())), size)
    }
}

/// Receives a boot file in pieces and checks it against its hash before it enters the store.
public final class BootFileReceiver {
    public let file: BootFile
    private let store: BootFileStore
    private let tmpPath: String
    private let handle: FileHandle
    private var hasher = SHA256()
    public private(set) var received: Int64 = 0

    public init(file: BootFile, store: BootFileStore) throws {
        self.file = file
        self.store = store
        try store.paths.ensure()
        tmpPath = store.paths.image(file.sha256) + ".part-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        guard FileManager.default.createFile(atPath: tmpPath, contents: nil),
              let h = FileHandle(forWritingAtPath: tmpPath) else {
            throw VMError.io("cannot create '\(tmpPath)'")
        }
        handle = h
    }

    deinit {
        try? handle.close()
        try? FileManager.default.removeItem(atPath: tmpPath)
    }

    public var isComplete: Bool { received == file.byteCount }

    /// Appends a piece; pieces must come in order. Throws on a gap, overflow or bad hash.
    public func append(offset: UInt64, bytes: [UInt8]) throws {
        guard offset == UInt64(received) else {
            throw VMError.badInput("boot file \(file.name): piece at \(offset), expected \(received)")
        }
        guard received + Int64(bytes.count) <= file.byteCount else {
            throw VMError.badInput("boot file \(file.name): more bytes than its size \(file.byteCount)")
        }
        try handle.write(contentsOf: bytes)
        hasher.update(data: bytes)
        received += Int64(bytes.count)
        if isComplete {
            // On disk now, not at the next record's fsync: a journal commit in the guest's
            // pause would otherwise write these megabytes first (ext4's ordered data).
            try handle.synchronize()
            try handle.close()
            let digest = Hex.encode(Array(hasher.finalize()))
            guard digest == file.sha256 else {
                throw VMError.badInput("boot file \(file.name): SHA-256 \(digest) does not match \(file.sha256)")
            }
            guard rename(tmpPath, store.paths.image(file.sha256)) == 0 else {
                throw VMError.io("cannot store boot file \(file.name)")
            }
            VMStore.syncDirectory(of: store.paths.image(file.sha256))
        }
    }
}
