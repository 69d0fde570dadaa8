import FerryIO
import Foundation
import Testing
@testable import FerryVM
@testable import FerryWire

@Suite("Room for guest RAM in the memory directory")
struct MemoryRoomTests {
    static let mib: UInt64 = 1 << 20

    static func tmpfs(size: UInt64 = 256 * mib, free: UInt64, unreserved: UInt64 = 0, reclaimable: UInt64 = 0) -> MemoryRoom {
        MemoryRoom(directory: "/run/room/ferry-0123", mountPoint: "/run/room", fileSystem: "tmpfs", blockByteCount: 4096,
                   sizeByteCount: size, freeByteCount: free, unreservedByteCount: unreserved,
                   reclaimableByteCount: reclaimable)
    }

    @Test("a RAM file takes whole blocks: pages on tmpfs, huge pages on hugetlbfs")
    func fileSize() {
        let tmpfs = Self.tmpfs(free: 0)
        #expect(tmpfs.fileByteCount(ramKiB: 384 * 1024) == 384 * Self.mib)
        #expect(tmpfs.fileByteCount(ramKiB: 384 * 1024 + 8) == 384 * Self.mib + 8192)  // the TCG pad
        var huge = tmpfs
        huge.fileSystem = "hugetlbfs"
        huge.blockByteCount = 2 * Self.mib
        #expect(huge.fileByteCount(ramKiB: 384 * 1024) == 384 * Self.mib)
        #expect(huge.fileByteCount(ramKiB: 384 * 1024 + 8) == 386 * Self.mib)
        huge.blockByteCount = 1 << 30
        #expect(huge.fileByteCount(ramKiB: 1024 * 1024 + 8) == 2 << 30)
    }

    @Test("fits when free plus reclaimable, less what running VMs were promised, holds the file",
          arguments: [
              // (free, unreserved, reclaimable, file, shortfall) in MiB
              (256, 0, 0, 256, 0),
              (256, 0, 0, 257, 1),
              (255, 0, 0, 256, 1),            // 256 MiB tmpfs with a little used: a 256 MiB VM does not fit
              (128, 0, 0, 192, 64),           // another VM's reserved 128 MiB is already counted as used
              (200, 100, 0, 128, 28),         // an older VM's sparse file may still grow by 100 MiB
              (200, 300, 0, 1, 1),            // promised more than is free: nothing is available
              (100, 0, 60, 160, 0),           // a dead VM's file of the same name is removed first
              (0, 0, 0, 0, 0),
          ] as [(UInt64, UInt64, UInt64, UInt64, UInt64)])
    func decision(_ free: UInt64, _ unreserved: UInt64, _ reclaimable: UInt64, _ file: UInt64, _ shortfall: UInt64) {
        let room = Self.tmpfs(free: free * Self.mib, unreserved: unreserved * Self.mib, reclaimable: reclaimable * Self.mib)
        #expect(room.shortfall(forFile: file * Self.mib) == shortfall * Self.mib)
    }

    @Test("the refusal names the directory, what is free, and how to make room")
    func message() {
        let room = Self.tmpfs(free: 255 * Self.mib + 600 * 1024, unreserved: 64 * Self.mib)
        let text = MemoryShortfall(vm: "big", fileByteCount: 384 * Self.mib + 8192, room: room).description
        #expect(text.contains("VM 'big' (384.0 MiB)"))
        #expect(text.contains("in /run/room/ferry-0123 (tmpfs at /run/room, size 256 MiB)"))
        #expect(text.contains("255.6 MiB free, 64 MiB of it promised to running VMs"))
        #expect(text.contains("SIGBUS"))
        // Size + shortfall (384 MiB + 8 KiB - 191.6 MiB), rounded up to a MiB.
        #expect(text.contains("mount -o remount,size=449M /run/room"), "\(text)")
        #expect(text.contains("FERRY_MEMORY_DIR"))

        var huge = room
        huge.fileSystem = "hugetlbfs"
        huge.blockByteCount = 2 * Self.mib
        huge.sizeByteCount = nil
        huge.unreservedByteCount = 0
        huge.freeByteCount = 10 * Self.mib
        let hugeText = MemoryShortfall(vm: "big", fileByteCount: 386 * Self.mib, room: huge).description
        #expect(hugeText.contains("hugetlbfs at /run/room, 2 MiB pages"))
        #expect(hugeText.contains("193 for this VM: echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"))
        #expect(!hugeText.contains("remount"))
    }

    @Test("a start reserves the whole RAM file on the real tmpfs; a VM too big for it is refused and leaves no file")
    func reserveOnTmpfs() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-room-\(UUID().uuidString.prefix(8))").path
        let store = VMStore(paths: StatePaths(root: root))
        try store.paths.ensure()
        defer {
            try? FileManager.default.removeItem(atPath: root)
            try? FileManager.default.removeItem(atPath: store.paths.memoryDirectory)
        }
        var spec = VMTests.paddedTCGSpec
        spec.memoryMiB = 16
        let file = store.paths.memoryFile("v")
        try store.reserveMemory(for: spec, file: file)
        var st = stat()
        #expect(stat(file, &st) == 0)
        #expect(st.st_size == 16 << 20 + 8192)
        #expect(UInt64(st.st_blocks) * 512 >= 16 << 20 + 8192, "the file is reserved, not sparse")
        #expect(try store.memoryRoom(for: "v").reclaimableByteCount >= 16 << 20, "a dead VM's file counts as free for its name")

        spec.name = "huge"
        spec.memoryMiB = 16 << 20  // 16 TiB
        #expect {
            try store.reserveMemory(for: spec, file: store.paths.memoryFile("huge"))
        } throws: { error in
            guard case .noMemoryRoom(let shortfall)? = error as? VMError else { return false }
            return shortfall.room.directory == store.paths.memoryDirectory && "\(error)".contains("no room for the RAM of VM 'huge'")
        }
        #expect(!FileManager.default.fileExists(atPath: store.paths.memoryFile("huge")))
    }
}
