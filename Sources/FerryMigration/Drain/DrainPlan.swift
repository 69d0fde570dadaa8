import FerryWire
import Foundation

/// Where each VM of a draining host goes: the pure part of `ferry drain`, decided from the
/// destinations' answers to `hostQuery` before anything moves (docs/ARCHITECTURE.md,
/// "Draining a host").
///
/// VMs are placed largest first (first-fit decreasing: the big ones have the fewest
/// places they fit). A destination fits a VM when it is not draining, has no VM of that
/// name, and has the VM's memory free after what the plan already sends it. Among those
/// that fit, the VM goes to the best score:
///
///     free memory left after it, as a share of what the host had free   (0...1)
///   + the host's link speed as a share of the fastest destination's     (0...1)
///   - half its load per CPU (load average / CPUs, at most 2)            (0...1)
///   - the share of this drain's VMs already planned for it              (0...1)
///
/// so VMs spread to keep every host's headroom, prefer the faster links, avoid busy hosts,
/// and go to several destinations at once rather than queue at one; ties go to the
/// destination named first.
public struct DrainPlan: Codable, Sendable, Equatable {
    public struct VM: Codable, Sendable, Equatable {
        public var name: String
        public var memoryMiB: Int
        public init(name: String, memoryMiB: Int) {
            self.name = name
            self.memoryMiB = memoryMiB
        }
        var bytes: UInt64 { UInt64(memoryMiB) << 20 }
    }

    /// A destination as it answered, under the name the operator gave it (`--to`).
    public struct Destination: Codable, Sendable, Equatable {
        public var name: String
        public var port: UInt16
        public var info: HostInfoMessage
        public init(name: String, port: UInt16, info: HostInfoMessage) {
            self.name = name
            self.port = port
            self.info = info
        }
        /// Its migration NICs' speeds together (unknown speeds count as nothing).
        public var linkBitsPerSecond: UInt64 {
            info.interfaces.filter(\.carrier).compactMap(\.speedBitsPerSecond).reduce(0, +)
        }
        public var loadPerCPU: Double { info.loadAverage / Double(max(1, info.cpus)) }
    }

    public struct Placement: Codable, Sendable, Equatable {
        public var vm: String
        public var memoryMiB: Int
        /// The destination's name as given to `--to`, and its port.
        public var destination: String
        public var port: UInt16
        /// The destination's host name, as it answered.
        public var host: String
        /// Why there: the figures the score came from.
        public var reason: String
    }

    public struct Unplaced: Codable, Sendable, Equatable {
        public var vm: String
        public var memoryMiB: Int
        public var reason: String
    }

    public var placements: [Placement]
    /// VMs that fit nowhere, each with why not for every destination.
    public var unplaced: [Unplaced]
    public var destinations: [Destination]

    public static func make(vms: [VM], destinations: [Destination]) -> DrainPlan {
        var free = destinations.map(\.info.freeGuestMemoryBytes)
        let fastest = destinations.map(\.linkBitsPerSecond).max() ?? 0
        var placements: [Placement] = []
        var unplaced: [Unplaced] = []
        var planned = Array(repeating: Set<String>(), count: destinations.count)
        let order = vms.enumerated().sorted { ($0.element.memoryMiB, -$0.offset) > ($1.element.memoryMiB, -$1.offset) }.map(\.element)
        for vm in order {
            var best: (index: Int, score: Double)?
            var refusals: [String] = []
            for (i, d) in destinations.enumerated() {
                if d.info.draining { refusals.append("\(d.name) is draining itself"); continue }
                if d.info.vms.contains(vm.name) || planned[i].contains(vm.name) {
                    refusals.append("\(d.name) has a VM named \(vm.name)"); continue
                }
                guard free[i] >= vm.bytes else {
                    refusals.append("\(d.name) has \(free[i] >> 20) MiB free"); continue
                }
                let initial = max(d.info.freeGuestMemoryBytes, 1)
                let memory = Double(free[i] - vm.bytes) / Double(initial)
                let link = fastest > 0 ? Double(d.linkBitsPerSecond) / Double(fastest) : 1
                let load = min(2, d.loadPerCPU) / 2
                let spread = Double(planned[i].count) / Double(max(1, vms.count))
                let score = memory + link - load - spread
                if best == nil || score > best!.score + 1e-9 { best = (i, score) }
            }
            guard let chosen = best else {
                unplaced.append(Unplaced(vm: vm.name, memoryMiB: vm.memoryMiB,
                                         reason: "needs \(vm.memoryMiB) MiB: " + refusals.joined(separator: "; ")))
                continue
            }
            let d = destinations[chosen.index]
            let reason = String(format: "%d MiB free before, %d after; link %@; load %.2f per CPU",
                                free[chosen.index] >> 20, (free[chosen.index] - vm.bytes) >> 20,
                                d.linkBitsPerSecond > 0 ? String(format: "%.1f Gbit/s", Double(d.linkBitsPerSecond) / 1e9) : "speed unknown",
                                d.loadPerCPU)
            free[chosen.index] -= vm.bytes
            planned[chosen.index].insert(vm.name)
            placements.append(Placement(vm: vm.name, memoryMiB: vm.memoryMiB, destination: d.name, port: d.port, host: d.info.host, reason: reason))
        }
        return DrainPlan(placements: placements, unplaced: unplaced, destinations: destinations)
    }

    /// The plan as an operator reads it (`--dry-run`, and before a drain starts).
    public var text: String {
        var lines: [String] = []
        for d in destinations {
            let info = d.info
            lines.append(String(format: "  %@  %@: %d MiB free for guests, %d VM(s), load %.2f on %d CPU(s), link %@, migrations %d running %d queued (max %d)%@",
                                d.name.padding(toLength: max(d.name.count, 10), withPad: " ", startingAt: 0), info.host,
                                info.freeGuestMemoryBytes >> 20, info.vms.count, info.loadAverage, info.cpus,
                                d.linkBitsPerSecond > 0 ? String(format: "%.1f Gbit/s", Double(d.linkBitsPerSecond) / 1e9) : "speed unknown",
                                info.runningMigrations, info.queuedMigrations, info.maxMigrations, info.draining ? ", DRAINING" : ""))
        }
        for p in placements {
            lines.append("  \(p.vm.padding(toLength: max(p.vm.count, 16), withPad: " ", startingAt: 0)) \(String(format: "%6d", p.memoryMiB)) MiB -> \(p.host) (\(p.destination))  (\(p.reason))")
        }
        for u in unplaced {
            lines.append("  \(u.vm.padding(toLength: max(u.vm.count, 16), withPad: " ", startingAt: 0)) \(String(format: "%6d", u.memoryMiB)) MiB -> NOWHERE  (\(u.reason))")
        }
        return lines.joined(separator: "\n")
    }
}
