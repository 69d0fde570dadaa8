import ArgumentParser
import FerryWire
import Foundation

/// Where the cluster key lives unless told otherwise.
enum KeyFile {
    static let defaultPath = "/etc/ferry/cluster.key"
    /// `--key-file`, else $FERRY_KEY_FILE, else /etc/ferry/cluster.key.
    static func path(_ given: String?) -> String {
        given ?? ProcessInfo.processInfo.environment["FERRY_KEY_FILE"].flatMap { $0.isEmpty ? nil : $0 } ?? defaultPath
    }
}

/// `--key-file` and `--insecure`, shared by `serve` and `migrate`.
struct SecurityOptions: ParsableArguments {
    @Option(name: .customLong("key-file"), help: "The cluster key file (default: $FERRY_KEY_FILE or \(KeyFile.defaultPath); create it with `ferry keygen`).")
    var keyFile: String?

    @Flag(help: "Run without authentication or encryption: anyone who can reach the port can send or take a VM, and the VM's memory crosses the network readable. Only for isolated test networks.")
    var insecure = false

    func validate() throws {
        if insecure && keyFile != nil { throw ValidationError("--insecure and --key-file exclude each other") }
    }

    /// The keys to use, or nil with `--insecure` (after a loud warning on stderr).
    func keys(for command: String) throws -> KeyRing? {
        if insecure {
            FileHandle.standardError.write(Data("""
                WARNING: ferry \(command) --insecure: no authentication, no encryption. Anyone on these
                WARNING: networks can read the VM's memory, inject into it, or send this host a VM.

                """.utf8))
            return nil
        }
        let path = KeyFile.path(keyFile)
        do {
            return try KeyRing.load(path: path)
        } catch {
            throw UserError("""
                ferry \(command): \(error)
                Create it once with `ferry keygen --output \(path)`, copy it to every host (mode 600),
                or pass --insecure on an isolated test network.
                """)
        }
    }
}

struct Keygen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a cluster key: every host that migrates VMs to or from another needs the same key file.",
        discussion: """
            The key is 256 random bits in a text file readable by root only. Copy it to every
            host of the cluster over a channel you trust (your configuration management).
            To rotate: `ferry keygen --add` on one host appends a new key, accepted but not yet
            used; copy that file to every host. Then move the new line first on every host (the
            first key is the one used), and finally delete the old line. See docs/SECURITY.md.
            """)

    @Option(help: "Where to write the key (default: $FERRY_KEY_FILE or \(KeyFile.defaultPath)).")
    var output: String?

    @Flag(help: "Append a new key to an existing file, accepted but not used until its line is moved first (rotation).")
    var add = false

    @Flag(help: "Replace an existing key file.")
    var force = false

    func run() throws {
        let path = KeyFile.path(output)
        let exists = FileManager.default.fileExists(atPath: path)
        let new = ClusterKey.generate()
        var keys = [new]
        if add {
            guard exists else { throw UserError("--add: there is no key file at \(path) to add to") }
            do {
                keys = try KeyRing.load(path: path).keys + [new]
            } catch {
                throw UserError("--add: \(error)")
            }
        } else if exists && !force {
            throw UserError("\(path) exists; replacing it cuts this host off from the cluster. Use --add to rotate, or --force.")
        }
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty && !FileManager.default.fileExists(atPath: directory) {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        }
        // Written to a private temporary file and renamed, so the key is never readable by others.
        let temporary = path + ".new-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL, 0o600)
        guard fd >= 0 else { throw UserError("cannot create \(temporary): \(String(cString: strerror(errno)))") }
        let text = "# Ferry cluster keys: the first is used, all are accepted. Keep secret (mode 600).\n" + KeyRing(keys: keys).fileText
        let written = text.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
        fsync(fd)
        close(fd)
        guard written == text.utf8.count, rename(temporary, path) == 0 else {
            unlink(temporary)
            throw UserError("cannot write \(path): \(String(cString: strerror(errno)))")
        }
        if add {
            print("added cluster key \(new.id) to \(path), accepted but not used; in use: \(keys[0].id)")
        } else {
            print("wrote \(path): cluster key \(new.id)")
        }
    }
}
