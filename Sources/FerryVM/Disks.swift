import FerryIO
import FerryWire
import Foundation

/// Disk images: what an image is (format and size, from `qemu-img`), creating the copy a
/// destination receives, and the QEMU options that attach a disk.
///
/// Disks are virtio-blk devices, one PCI device per disk: the guest's path is the shortest
/// (no SCSI layer, no controller to configure), it is what libvirt gives a `vda`, and a
/// Ferry VM has a handful of disks, not hundreds (virtio-scsi's reason to exist: many
/// LUNs on one controller, hotplug, SCSI passthrough). QEMU gets each disk as two
/// `-blockdev` nodes, the file and the format on top of it, with the format recorded in
/// the spec and never probed by QEMU.
public enum DiskImage {
    /// The node names QEMU knows a disk by: `diskN` (the format node: the device's drive,
    /// the mirror's source, the NBD export) on `diskN-file`, or `diskN-shared` for a
    /// shared disk's file (so that `ferry vm repair` can tell from QEMU's command line).
    public static func nodeName(_ index: Int) -> String { "disk\(index)" }
    static func ioThreadName(_ index: Int) -> String { "disk\(index)-io" }
    /// The guest device's id (what `block_set_io_throttle` names).
    public static func deviceName(_ index: Int) -> String { "vd\(index)" }
    public static func fileNodeName(_ index: Int, shared: Bool) -> String { "disk\(index)-" + (shared ? "shared" : "file") }

    /// The QEMU options for the VM's disks, in order (the guest sees vda, vdb, ...), each
    /// at `paths[i]` (the spec's own path unless the destination keeps its copy elsewhere).
    /// `bootFromDisk`: the first disk is the one the firmware boots (no kernel given).
    public static func qemuArguments(_ disks: [DiskSpec], paths: [String]? = nil, bootFromDisk: Bool = false) -> [String] {
        var argv: [String] = []
        for (i, disk) in disks.enumerated() {
            let path = paths?[i] ?? disk.path
            // Direct I/O (libvirt's cache=none) where the filesystem has it: no host page
            // cache between the guest and the image, so a shared image holds no stale pages
            // on either host at the switchover, and a copy costs no page-cache copy.
            let direct = HostInfo.supportsDirectIO(path: path) ? ",cache.direct=on" : ""
            argv += ["-blockdev", "driver=file,filename=\(QEMU.optionValue(path)),node-name=\(fileNodeName(i, shared: disk.shared)),discard=unmap\(direct)",
                     "-blockdev", "driver=\(disk.format.rawValue),file=\(fileNodeName(i, shared: disk.shared)),node-name=\(nodeName(i)),discard=unmap",
                     // Its own I/O thread: the disk's requests, and a mirror's copy of it, are
                     // served outside QEMU's main loop and its lock, which the vCPUs need.
                     "-object", "iothread,id=\(ioThreadName(i))",
                     "-device", "virtio-blk-pci,drive=\(nodeName(i)),id=\(deviceName(i)),iothread=\(ioThreadName(i))" + (i == 0 && bootFromDisk ? ",bootindex=1" : "")]
        }
        return argv
    }

    /// What `--disk PATH[,format=F]` names: the image's format and virtual size. `format`:
    /// what the operator said, which wins over what `qemu-img` probes for `raw` (a raw
    /// image whose guest wrote a qcow2 header must stay raw); a `qcow2` that is not one
    /// is refused.
    public static func inspect(path: String, format: DiskFormat?) throws -> (DiskFormat, UInt64) {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw VMError.badInput("disk image \(path) does not exist (Ferry does not create a VM's disks; make one with qemu-img create)")
        }
        guard !isDirectory.boolValue, FileManager.default.isWritableFile(atPath: path) else {
            throw VMError.badInput("disk image \(path) is not a file this host can write")
        }
        let info = try qemuImgInfo(path: path, format: format)
        guard let probed = info.format.flatMap(DiskFormat.init(rawValue:)) else {
            throw VMError.badInput("disk image \(path) is in format \(info.format ?? "unknown"); Ferry attaches raw and qcow2 images")
        }
        if let format, format != probed, format == .qcow2 {
            throw VMError.badInput("disk image \(path) is \(probed.rawValue), not qcow2")
        }
        guard let size = info.virtualSize, size > 0 else { throw VMError.badInput("disk image \(path) has no size") }
        return (format ?? probed, size)
    }

    struct ImgInfo: Decodable {
        var format: String?
        var virtualSize: UInt64?
        enum CodingKeys: String, CodingKey {
            case format
            case virtualSize = "virtual-size"
        }
    }

    private static func qemuImgInfo(path: String, format: DiskFormat?) throws -> ImgInfo {
        // -U: the image may be in use by a running VM (a spec being checked again).
        var argv = [qemuImg, "info", "--output=json", "-U"]
        if let format { argv += ["-f", format.rawValue] }
        let result = try run(argv + [path])
        guard result.succeeded, let info = try? JSONDecoder().decode(ImgInfo.self, from: Data(result.stdout.utf8)) else {
            throw VMError.badInput("cannot read disk image \(path): \(result.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return info
    }

    /// Creates the empty image a copied disk is mirrored into: the same format and virtual
    /// size, sparse (nothing allocated until written). Refuses to touch a file that exists.
    public static func create(path: String, format: DiskFormat, virtualSizeBytes: UInt64) throws {
        guard !FileManager.default.fileExists(atPath: path) else {
            throw VMError.badInput("\(path) already exists (a copy left by an earlier migration?); remove it or choose another --disk-dir")
        }
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        let result = try run([qemuImg, "create", "-q", "-f", format.rawValue, path, String(virtualSizeBytes)])
        guard result.succeeded else {
            throw VMError.badInput("cannot create disk image \(path): \(result.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
    }

    /// Bytes the image takes on the host's filesystem (allocated blocks): a sparse copy
    /// stays far below its virtual size.
    public static func allocatedBytes(path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return UInt64(st.st_blocks) * 512
    }

    /// `qemu-img` beside the QEMU in use (`FERRY_QEMU_IMG`, else the one on the PATH).
    static var qemuImg: String { ProcessInfo.processInfo.environment["FERRY_QEMU_IMG"] ?? "qemu-img" }

    private static func run(_ argv: [String]) throws -> CommandResult {
        do {
            return try Command.run(argv)
        } catch {
            throw VMError.badInput("cannot run \(argv[0]) (install qemu-utils): \(error)")
        }
    }
}

/// The proof that a disk marked shared is the same file on both hosts: the source writes a
/// fresh random token beside the image (`IMAGE.ferry-shared`, durably) just before its
/// offer, and the destination reads it at the same path. A different file (a local copy, a
/// stale snapshot, nothing at all) cannot hold a token made a moment ago.
public enum SharedDiskToken {
    public static func path(for image: String) -> String { image + ".ferry-shared" }

    /// Writes a new token beside `image` and returns it.
    public static func write(for image: String, vm: String) throws -> String {
        let token = (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        let text = "\(token) \(vm) \(HostInfo.hostname) \(Int(Date().timeIntervalSince1970))\n"
        do {
            try VMStore.writeDurably(Data(text.utf8), to: path(for: image))
        } catch {
            throw VMError.badInput("disk \(image) is marked shared, but its token \(path(for: image)) cannot be written: \(error)")
        }
        return token
    }

    /// The token beside `image`, if any.
    public static func read(for image: String) -> String? {
        guard let text = try? String(contentsOfFile: path(for: image), encoding: .utf8) else { return nil }
        return text.split(separator: " ").first.map(String.init)
    }
}
