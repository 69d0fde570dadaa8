import FerryIO
import FerryVM
import FerryWire
import Foundation

// What `ferry serve` says of its host when a peer asks (`hostQuery`, protocol v5): the
// figures `ferry drain` places VMs by.
extension MigrationServer {
    /// Memory kept for the host itself (its kernel, daemons, QEMU's own overhead) when
    /// counting what guests may still take: 512 MiB, or 1/16 of the host's memory.
    static func hostReserveBytes(physical: UInt64) -> UInt64 { max(512 << 20, physical / 16) }

    /// Guest memory of the VMs here (running or paused, and those arriving), bytes;
    /// `excluding` one (an offer of that name replaces what a dead copy held).
    func guestMemoryBytes(excluding: String? = nil) -> UInt64 {
        guestMemoryBytes(store.entries(), excluding: excluding)
    }

    /// The same, of entries already read.
    private func guestMemoryBytes(_ entries: [VMEntry], excluding: String? = nil) -> UInt64 {
        var byName: [String: Int] = [:]
        for entry in entries {
            if case .healthy(let record) = entry, record.alive { byName[record.spec.name] = record.spec.memoryMiB }
        }
        for (name, mib) in arrivingMiB { byName[name] = mib }
        if let excluding { byName[excluding] = nil }
        return byName.values.reduce(0) { $0 + UInt64($1) << 20 }
    }

    /// This host now: room, load, migrations, NICs, and whether it is draining.
    func hostInfo() -> HostInfoMessage {
        let entries = store.entries()
        let used = guestMemoryBytes(entries)
        let physical = UInt64(ProcessInfo.processInfo.physicalMemory)
        let reserve = Self.hostReserveBytes(physical: physical)
        let available = VMStore.hostAvailableMemoryByteCount()
        var free = available > reserve ? available - reserve : 0
        if let room = try? store.memoryRoom(for: "") { free = min(free, room.availableByteCount) }
        if let limit = options.maxGuestMemoryBytes { free = min(free, limit > used ? limit - used : 0) }
        let vms = Set(arrivingMiB.keys).union(entries.map(\.name))
        let load = (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?
            .split(separator: " ").first.flatMap { Double($0) } ?? 0
        let queue = admission.snapshot
        return HostInfoMessage(host: HostInfo.hostname, freeGuestMemoryBytes: free, guestMemoryBytes: used,
                               maxGuestMemoryBytes: options.maxGuestMemoryBytes, vms: vms.sorted(),
                               loadAverage: load, cpus: ProcessInfo.processInfo.activeProcessorCount,
                               runningMigrations: queue.running.count, queuedMigrations: queue.queued.count,
                               maxMigrations: options.maxMigrations,
                               draining: DrainMarker.current(runDirectory: store.paths.runDirectory) != nil,
                               interfaces: offeredInterfaces())
    }
}
