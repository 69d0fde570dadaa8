import FerryWire
import Foundation

/// Room for guest RAM in a host's memory directory (``StatePaths/memoryDirectory``): what
/// the file system there can still give, and whether a VM's RAM file fits. A value with no
/// I/O; ``VMStore/memoryRoom(for:)`` measures it.
///
/// Why it matters: guest RAM is a `share=on` file on tmpfs (or hugetlbfs). A file on tmpfs
/// is sparse, so QEMU starts whatever the room, and the guest's first write to a page the
/// file system cannot give kills QEMU with SIGBUS. Ferry therefore reserves every VM's
/// whole file (`fallocate`) before its QEMU starts, and checks the room first so that the
/// refusal says what to do (docs/ARCHITECTURE.md, "Sizing the memory directory").
public struct MemoryRoom: Sendable, Equatable {
    /// The host's memory directory.
    public var directory: String
    /// The mount that holds it and its type ("tmpfs" or "hugetlbfs").
    public var mountPoint: String
    public var fileSystem: String
    /// The file system's block: a page on tmpfs (4 KiB), a huge page on hugetlbfs (2 MiB,
    /// 1 GiB). A RAM file takes whole blocks.
    public var blockByteCount: UInt64
    /// The file system's size; nil when it has none of its own (tmpfs `size=0`, hugetlbfs
    /// without `size=`: then the host's memory or its huge page pool is the limit).
    public var sizeByteCount: UInt64?
    /// What can still be allocated there now (statvfs; the free huge pages on hugetlbfs; the
    /// host's available memory on a tmpfs without a size).
    public var freeByteCount: UInt64
    /// Pages that running VMs' RAM files may still take although nothing reserved them
    /// (the sparse part of files of VMs started before Ferry reserved RAM): promised, so
    /// not free for a new VM.
    public var unreservedByteCount: UInt64
    /// Pages held by a file that starting this VM removes first (left by a dead VM of the
    /// same name): free for it.
    public var reclaimableByteCount: UInt64

    public init(directory: String, mountPoint: String, fileSystem: String, blockByteCount: UInt64,
                sizeByteCount: UInt64?, freeByteCount: UInt64, unreservedByteCount: UInt64 = 0,
                reclaimableByteCount: UInt64 = 0) {
        self.directory = directory
        self.mountPoint = mountPoint
        self.fileSystem = fileSystem
        self.blockByteCount = max(blockByteCount, 1)
        self.sizeByteCount = sizeByteCount
        self.freeByteCount = freeByteCount
        self.unreservedByteCount = unreservedByteCount
        self.reclaimableByteCount = reclaimableByteCount
    }

    /// The size of a RAM file of `ramKiB` (``QEMU/ramKiB(_:)``) on this file system: whole
    /// blocks, as QEMU maps RAM rounded up to the file system's page (a 384 MiB + 8 KiB
    /// TCG guest takes 386 MiB of 2 MiB huge pages), so that the file covers every page
    /// QEMU maps and the room is counted in what the file really takes.
    public func fileByteCount(ramKiB: Int) -> UInt64 {
        let bytes = UInt64(max(ramKiB, 0)) * 1024
        return (bytes + blockByteCount - 1) / blockByteCount * blockByteCount
    }

    /// What a new VM may take: free plus reclaimable, less what is promised to others.
    public var availableByteCount: UInt64 {
        let free = freeByteCount + reclaimableByteCount
        return free > unreservedByteCount ? free - unreservedByteCount : 0
    }

    /// How much is missing for a file of `byteCount`; 0 if it fits.
    public func shortfall(forFile byteCount: UInt64) -> UInt64 {
        byteCount > availableByteCount ? byteCount - availableByteCount : 0
    }

    /// The size to give the file system so that it holds `byteCount` more: its size plus
    /// the shortfall, rounded up to a MiB (nil when it has no size to change).
    public func suggestedSizeByteCount(forFile byteCount: UInt64) -> UInt64? {
        guard let size = sizeByteCount else { return nil }
        let wanted = size + shortfall(forFile: byteCount)
        return ((wanted + (1 << 20) - 1) >> 20) << 20
    }
}

/// Why a VM cannot have its RAM on this host: the room and what the VM needs. Its
/// description names the directory, says what is free and how to make room.
public struct MemoryShortfall: Sendable, Equatable, CustomStringConvertible {
    public var vm: String
    /// The size of the VM's RAM file (``MemoryRoom/fileByteCount(ramKiB:)``).
    public var fileByteCount: UInt64
    public var room: MemoryRoom

    public var description: String {
        let free = Self.mib(room.freeByteCount)
        var have = "\(free) free"
        if room.unreservedByteCount > 0 { have += ", \(Self.mib(room.unreservedByteCount)) of it promised to running VMs" }
        if room.reclaimableByteCount > 0 { have += ", plus \(Self.mib(room.reclaimableByteCount)) held by a dead VM's file" }
        let fs: String
        var fixes: [String] = []
        if room.fileSystem == "hugetlbfs" {
            let page = room.blockByteCount >> 10
            let pages = (fileByteCount + room.blockByteCount - 1) / room.blockByteCount
            fs = "hugetlbfs at \(room.mountPoint), \(Self.mib(room.blockByteCount)) pages"
            fixes.append("reserve more huge pages (\(pages) for this VM: echo N > /sys/kernel/mm/hugepages/hugepages-\(page)kB/nr_hugepages)")
            if let size = room.suggestedSizeByteCount(forFile: fileByteCount) {
                fixes.append("mount -o remount,size=\(size >> 20)M \(room.mountPoint)")
            }
        } else {
            let size = room.sizeByteCount.map { ", size \(Self.mib($0))" } ?? ", no size limit: the host's available memory"
            fs = "\(room.fileSystem) at \(room.mountPoint)\(size)"
            if let size = room.suggestedSizeByteCount(forFile: fileByteCount) {
                fixes.append("mount -o remount,size=\(size >> 20)M \(room.mountPoint)")
            }
        }
        fixes.append("stop or migrate away a VM of this host")
        fixes.append("set FERRY_MEMORY_DIR to a tmpfs or hugetlbfs mount with room")
        return "no room for the RAM of VM '\(vm)' (\(Self.mib(fileByteCount))) in \(room.directory) (\(fs)): \(have). "
            + "Its QEMU would die (SIGBUS) once the guest filled the file system. To make room: "
            + fixes.joined(separator: ", or ") + " (see \"Sizing the memory directory\" in docs/ARCHITECTURE.md)"
    }

    /// Bytes in MiB for a reader, e.g. "255.9 MiB".
    static func mib(_ bytes: UInt64) -> String {
        let value = Double(bytes) / 1_048_576
        return value == value.rounded() ? "\(Int(value)) MiB" : String(format: "%.1f MiB", value)
    }
}

extension VMStore {
    /// Refuses a VM whose RAM this host's memory directory cannot hold, with a message that
    /// says what to do; the check `ferry serve` runs on an offer, before anything moves.
    /// Creates the directory (and checks it is memory) if needed. A same-host update never
    /// calls it: its new QEMU maps the file the VM already has.
    public func checkMemoryRoom(for spec: VMSpec) throws {
        _ = try roomChecked(for: spec)
    }

    /// The room, once it is known to hold `spec`'s RAM file, and that file's size.
    private func roomChecked(for spec: VMSpec) throws -> (MemoryRoom, UInt64) {
        try prepareMemoryDirectory()
        let room = try memoryRoom(for: spec.name)
        let bytes = room.fileByteCount(ramKiB: QEMU.ramKiB(spec))
        if room.shortfall(forFile: bytes) > 0 {
            throw VMError.noMemoryRoom(MemoryShortfall(vm: spec.name, fileByteCount: bytes, room: room))
        }
        return (room, bytes)
    }

    /// Checks the room and reserves the VM's whole RAM file (`fallocate`), before its QEMU
    /// starts; QEMU maps a file that already has its size as it is. A concurrent start
    /// that took the room first fails here with the same message (the kernel's count of
    /// the file system's blocks decides, not Ferry's arithmetic).
    func reserveMemory(for spec: VMSpec, file: String) throws {
        let (room, bytes) = try roomChecked(for: spec)
        let fd = open(file, O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw VMError.io("cannot create the guest RAM file \(file): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        // glibc's posix_fallocate is fallocate(2) on tmpfs (since Linux 3.5) and hugetlbfs
        // (since 4.3); it would write zeros only on a file system without it, which the
        // directory check rules out. It allocates the pages without zeroing them (tmpfs
        // zeroes a page when it is first touched), and an interrupted call is started again.
        var result: Int32
        repeat { result = posix_fallocate(fd, 0, off_t(bytes)) } while result == EINTR
        if result == ENOSPC {
            _ = unlink(file)
            var now = (try? memoryRoom(for: spec.name)) ?? room
            now.reclaimableByteCount = 0
            throw VMError.noMemoryRoom(MemoryShortfall(vm: spec.name, fileByteCount: bytes, room: now))
        }
        guard result == 0 else {
            _ = unlink(file)
            throw VMError.io("cannot reserve \(MemoryShortfall.mib(bytes)) for the guest RAM file \(file): \(String(cString: strerror(result)))")
        }
    }

    /// Measures the room in this host's memory directory for VM `name`: the file system's
    /// free space, less the unreserved part of other running VMs' RAM files, plus what
    /// `name`'s own file holds if no QEMU of it runs (starting it removes that file).
    public func memoryRoom(for name: String) throws -> MemoryRoom {
        let dir = paths.memoryDirectory
        var fs = statvfs()
        guard statvfs(dir, &fs) == 0 else {
            throw VMError.io("cannot measure the guest memory directory \(dir): \(String(cString: strerror(errno)))")
        }
        let (mountPoint, type) = Self.mount(of: dir) ?? (dir, "unknown")
        let block = UInt64(fs.f_bsize)
        let size: UInt64? = fs.f_blocks > 0 ? UInt64(fs.f_blocks) * UInt64(fs.f_frsize) : nil
        var free = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
        if type == "hugetlbfs" {
            // The pool of free huge pages of this size is the limit; `size=` may add one.
            let pool = Self.freeHugePages(pageByteCount: block) * block
            free = size == nil ? pool : min(free, pool)
        } else if size == nil {
            free = Self.hostAvailableMemoryByteCount()
        }
        var unreserved: UInt64 = 0
        var reclaimable: UInt64 = 0
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        for file in files where file.hasSuffix(".ram") {
            var st = stat()
            guard stat(dir + "/" + file, &st) == 0 else { continue }
            let owner = String(file.dropLast(4))
            let alive = (try? record(owner))?.alive ?? false
            let allocated = UInt64(st.st_blocks) * 512
            if owner == name {
                if !alive { reclaimable += allocated }
            } else if alive {
                let whole = (UInt64(max(st.st_size, 0)) + block - 1) / block * block
                if whole > allocated { unreserved += whole - allocated }
            }
        }
        return MemoryRoom(directory: dir, mountPoint: mountPoint, fileSystem: type, blockByteCount: block,
                          sizeByteCount: size, freeByteCount: free, unreservedByteCount: unreserved,
                          reclaimableByteCount: reclaimable)
    }

    /// The mount point and type of the file system holding `path` (the longest mount point
    /// above it in /proc/mounts).
    static func mount(of path: String) -> (point: String, type: String)? {
        guard let mounts = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return nil }
        let real = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        var best: (point: String, type: String)?
        for line in mounts.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count >= 3 else { continue }
            let point = fields[1].replacingOccurrences(of: "\\040", with: " ")
            let under = point == "/" || real == point || real.hasPrefix(point + "/")
            if under && point.count >= (best?.point.count ?? -1) { best = (point, String(fields[2])) }
        }
        return best
    }

    /// Free huge pages of the given size that no mapping has reserved yet.
    static func freeHugePages(pageByteCount: UInt64) -> UInt64 {
        let dir = "/sys/kernel/mm/hugepages/hugepages-\(pageByteCount >> 10)kB/"
        func read(_ name: String) -> UInt64 {
            (try? String(contentsOfFile: dir + name, encoding: .utf8))
                .flatMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
        }
        let free = read("free_hugepages"), reserved = read("resv_hugepages")
        return free > reserved ? free - reserved : 0
    }

    /// MemAvailable from /proc/meminfo: the limit of a tmpfs mounted without a size.
    public static func hostAvailableMemoryByteCount() -> UInt64 {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            let kib = line.split(separator: " ").dropFirst().first.flatMap { UInt64($0) } ?? 0
            return kib * 1024
        }
        return 0
    }
}
