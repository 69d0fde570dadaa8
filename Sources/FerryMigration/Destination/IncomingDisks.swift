import FerryIO
import FerryQMP
import FerryTransport
import FerryVM
import FerryWire
import Foundation

/// An incoming VM's disks at the destination: where each is kept here, which are copied
/// (and so served over NBD to the source's mirrors), and what this session created (and
/// removes again if the migration fails).
struct IncomingDisks {
    /// One per disk of the offer's spec: the shared image's own path, or the copy's.
    var paths: [String] = []
    /// Indices of the disks copied here.
    var copied: [Int] = []
    /// Images this session created (removed when its copy is discarded).
    var created: [String] = []
    /// Copies whose NBD stream is open (each opens once).
    var opened = Set<Int>()
    /// Their streams, as the source numbered them.
    var streams = Set<UInt32>()
    /// The NBD server's socket, in the VM's directory, once it serves.
    var socket: String?
}

extension DestinationSession {
    /// Checks the offer's disks and decides where each goes; returns the spec as this host
    /// runs it (each disk at its local path). A shared disk must be the same file here:
    /// the token the source has just written beside it must be here too. A copied disk
    /// gets a new image (made later, in ``createDiskImages(for:)``), which must not exist.
    func placeDisks(_ offer: OfferMessage) throws(IncomingError) -> VMSpec {
        var spec = offer.spec
        guard !spec.disks.isEmpty else { return spec }
        guard version >= ProtocolVersion.twoWayStreams else {
            throw .refused(.badOffer, "a VM with disks needs protocol v\(ProtocolVersion.twoWayStreams); this session speaks v\(version)")
        }
        let tokens = offer.sharedDiskTokens ?? []
        guard tokens.count == spec.disks.count else { throw .refused(.badOffer, "the offer's shared-disk tokens do not match its disks") }
        let directory = (server.options.diskDirectory ?? store.paths.disksDirectory) + "/" + spec.name
        for (i, disk) in spec.disks.enumerated() {
            let name = DiskSpec.guestName(i)
            guard disk.path.hasPrefix("/"), disk.virtualSizeBytes > 0, disk.virtualSizeBytes <= 1 << 50 else {
                throw .refused(.badOffer, "disk \(name) has a malformed path or size")
            }
            if disk.shared {
                guard let token = tokens[i], token.count == 32 else { throw .refused(.badOffer, "disk \(name) is shared but has no token") }
                guard FileManager.default.fileExists(atPath: disk.path) else {
                    throw .refused(.badOffer, "disk \(name) is marked shared, but \(disk.path) does not exist on \(HostInfo.hostname)")
                }
                guard SharedDiskToken.read(for: disk.path) == token else {
                    throw .refused(.badOffer, "disk \(name) is marked shared, but \(disk.path) on \(HostInfo.hostname) is not the same file "
                        + "as on the source (the token the source wrote beside it, \(SharedDiskToken.path(for: disk.path)), is not here): "
                        + "refusing, so that two hosts never write different copies of one disk")
                }
                disks.paths.append(disk.path)
            } else {
                let path = directory + "/disk\(i).\(disk.format.rawValue)"
                guard !FileManager.default.fileExists(atPath: path) else {
                    throw .refused(.badOffer, "disk \(name) would be copied to \(path) on \(HostInfo.hostname), which already exists "
                        + "(a copy left by an earlier migration?); remove it or run ferry serve with another --disk-dir")
                }
                disks.paths.append(path)
                disks.copied.append(i)
                spec.disks[i].path = path
            }
        }
        try checkRoom(for: spec, directory: directory, allocated: offer.diskAllocatedBytes)
        return spec
    }

    /// Room for the copies' data where they go: what the source's images take now, and a
    /// sixteenth more for the guest's writes during the copy and the format's metadata.
    private func checkRoom(for spec: VMSpec, directory: String, allocated: [UInt64]?) throws(IncomingError) {
        guard !disks.copied.isEmpty else { return }
        let needed = disks.copied.reduce(UInt64(0)) { sum, i in
            sum + (allocated.flatMap { i < $0.count ? $0[i] : nil } ?? spec.disks[i].virtualSizeBytes)
        }
        // The nearest directory that exists is on the filesystem the copies will be on.
        var probe = directory
        while !FileManager.default.fileExists(atPath: probe) && probe != "/" { probe = (probe as NSString).deletingLastPathComponent }
        var fs = statvfs()
        guard statvfs(probe, &fs) == 0 else { return }
        let free = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
        guard free >= needed + needed / 16 else {
            throw .refused(.badOffer, "not enough room on \(HostInfo.hostname) for the disks' data: \(Format.bytes(needed)) to copy into "
                + "\(directory), \(Format.bytes(free)) free")
        }
    }

    /// Creates the empty images the copied disks go into (just before QEMU opens them).
    func createDiskImages(for spec: VMSpec) throws(IncomingError) {
        for i in disks.copied {
            let disk = spec.disks[i]
            do {
                try DiskImage.create(path: disk.path, format: disk.format, virtualSizeBytes: disk.virtualSizeBytes)
            } catch {
                throw .qemu("cannot create disk \(DiskSpec.guestName(i))'s image: \(error)")
            }
            disks.created.append(disk.path)
        }
    }

    /// The NBD server the source's mirrors write the copies into: QEMU serves each copied
    /// disk's node, writable, on a Unix socket in the VM's directory that only the data
    /// path's two-way streams connect to.
    func serveDiskCopies(_ qmp: QMPClient, paths: VMPaths) throws(IncomingError) {
        guard !disks.copied.isEmpty else { return }
        let socket = paths.directory + "/nbd.sock"
        do {
            // SocketAddressLegacy here: the address sits under `data`.
            try qmp.execute("nbd-server-start", arguments: ["addr": ["type": "unix", "data": ["path": .string(socket)]]])
            for i in disks.copied {
                try qmp.execute("block-export-add", arguments: [
                    "type": "nbd", "id": .string(DiskImage.nodeName(i)), "node-name": .string(DiskImage.nodeName(i)), "writable": true,
                ])
            }
        } catch {
            throw .qemu("cannot serve the disk copies over NBD: \(error)")
        }
        disks.socket = socket
    }

    /// The source opened a two-way stream: a disk copy's NBD connection. It is connected to
    /// this session's NBD server, and only for a disk this session copies, once.
    func openDiskStream(_ open: StreamOpenMessage, dataPath: DestinationDataPath) throws(IncomingError) {
        guard open.kind == .nbd, let target = open.target, let index = Int(target), disks.copied.contains(index),
              let socket = disks.socket else {
            throw .protocolViolation("stream \(open.stream) of kind \(open.kind?.rawValue ?? "migration") for \(open.target ?? "nothing"): "
                + "this session serves no such stream")
        }
        guard disks.opened.insert(index).inserted else { throw .protocolViolation("disk \(index)'s copy opened twice") }
        disks.streams.insert(open.stream)
        do {
            let connection = try Socket.connectUnix(path: socket)
            try dataPath.openTwoWay(stream: open.stream, socket: connection, priority: open.priority ?? 0)
        } catch {
            throw .dataPath((error as? TransportError) ?? .aborted("cannot connect disk \(index)'s copy to the NBD server: \(error)"))
        }
        logger.info("disk copy connected", metadata: ["vm": "\(vmName ?? "?")", "disk": "\(DiskSpec.guestName(index))", "stream": "\(open.stream)"])
    }

    /// Before `cont`: the copies are complete (the source finished its mirrors before it
    /// sent the device state), and the VM must not run with its disks still exported.
    /// The source closed its NBD clients before the device state too, but the last bytes
    /// they sent (the disconnect) may still be on their way through the channels when QEMU
    /// has loaded the VM: the server is stopped only once each copy's stream has been
    /// written to it whole, or it would close under them, their write fail and the session
    /// with it (seen once in CI, when the device state overtook the NBD stream's tail).
    func stopServingDisks(_ qmp: QMPClient, dataPath: DestinationDataPath? = nil) throws(IncomingError) {
        guard disks.socket != nil else { return }
        if let dataPath {
            let streams = disks.streams
            let waited = Stopwatch()
            while !streams.allSatisfy({ dataPath.isWritten(half: $0) }) && waited.elapsed < 5 { usleep(500) }
            if waited.elapsed >= 5 {
                logger.warning("a disk copy's stream was not written whole 5 s after the VM loaded; stopping its NBD server anyway",
                               metadata: ["vm": "\(vmName ?? "?")"])
            }
        }
        do {
            try qmp.execute("nbd-server-stop")
        } catch {
            throw .qemu("cannot stop serving the disk copies: \(error)")
        }
        disks.socket = nil
    }

    /// A discarded copy's images go with it.
    func removeCreatedDisks() {
        for path in disks.created { try? FileManager.default.removeItem(atPath: path) }
        disks.created = []
    }
}
