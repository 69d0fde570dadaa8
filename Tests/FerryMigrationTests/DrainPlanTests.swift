@testable import FerryMigration
import FerryWire
import Foundation
import Testing

@Suite("Drain placement: where each VM of a draining host goes")
struct DrainPlanTests {
    static func host(_ name: String, freeMiB: UInt64, vms: [String] = [], load: Double = 0, cpus: Int = 2,
                     gbit: [UInt64] = [1, 1], draining: Bool = false) -> DrainPlan.Destination {
        let nics = gbit.enumerated().map { i, g in
            InterfaceMessage(name: "eth\(i)", addresses: ["10.77.\(i + 1).9/24"], speedBitsPerSecond: g * 1_000_000_000, mtu: 1500, carrier: true)
        }
        let info = HostInfoMessage(host: name, freeGuestMemoryBytes: freeMiB << 20, guestMemoryBytes: 0, maxGuestMemoryBytes: nil,
                                   vms: vms, loadAverage: load, cpus: cpus, runningMigrations: 0, queuedMigrations: 0,
                                   maxMigrations: 2, draining: draining, interfaces: nics)
        return DrainPlan.Destination(name: name, port: 7470, info: info)
    }

    static func vms(_ sizes: [Int]) -> [DrainPlan.VM] {
        sizes.enumerated().map { DrainPlan.VM(name: "vm\($0.offset)", memoryMiB: $0.element) }
    }

    func destinations(_ plan: DrainPlan) -> [String: String] {
        Dictionary(uniqueKeysWithValues: plan.placements.map { ($0.vm, $0.destination) })
    }

    @Test("largest first, each where it fits: a big VM takes the only host with room for it, the small ones fill around it")
    func firstFitDecreasing() {
        let plan = DrainPlan.make(vms: Self.vms([512, 4096, 512]),
                                  destinations: [Self.host("b", freeMiB: 2048), Self.host("c", freeMiB: 5000)])
        #expect(plan.unplaced.isEmpty)
        #expect(plan.placements.first?.vm == "vm1", "the 4 GiB VM is placed first")
        #expect(destinations(plan)["vm1"] == "c")
        // Placed in order, no host is ever given more than it had free.
        for d in ["b", "c"] {
            let free: UInt64 = d == "b" ? 2048 : 5000
            #expect(plan.placements.filter { $0.destination == d }.reduce(0) { $0 + UInt64($1.memoryMiB) } <= free)
        }
    }

    @Test("equal hosts share the VMs, rather than one queueing them all")
    func spreads() {
        let plan = DrainPlan.make(vms: Self.vms([256, 256, 256, 256]),
                                  destinations: [Self.host("b", freeMiB: 8192), Self.host("c", freeMiB: 8192)])
        let counts = Dictionary(grouping: plan.placements, by: \.destination).mapValues(\.count)
        #expect(counts == ["b": 2, "c": 2])
    }

    @Test("a faster link and a lighter load win between hosts with the same room")
    func linkAndLoad() {
        let faster = DrainPlan.make(vms: Self.vms([256]),
                                    destinations: [Self.host("b", freeMiB: 8192, gbit: [1]), Self.host("c", freeMiB: 8192, gbit: [10, 10])])
        #expect(destinations(faster)["vm0"] == "c")
        let lighter = DrainPlan.make(vms: Self.vms([256]),
                                     destinations: [Self.host("b", freeMiB: 8192, load: 3.8), Self.host("c", freeMiB: 8192, load: 0.2)])
        #expect(destinations(lighter)["vm0"] == "c")
    }

    @Test("never to a draining host, nor one that has a VM of that name; nowhere says why for each host")
    func refusals() {
        let plan = DrainPlan.make(vms: [DrainPlan.VM(name: "web", memoryMiB: 1024), DrainPlan.VM(name: "db", memoryMiB: 4096)],
                                  destinations: [Self.host("b", freeMiB: 8192, draining: true),
                                                 Self.host("c", freeMiB: 2048, vms: ["web"])])
        #expect(plan.placements.isEmpty)
        let reasons = Dictionary(uniqueKeysWithValues: plan.unplaced.map { ($0.vm, $0.reason) })
        #expect(reasons["web"]?.contains("b is draining itself") == true)
        #expect(reasons["web"]?.contains("c has a VM named web") == true)
        #expect(reasons["db"]?.contains("c has 2048 MiB free") == true, "\(reasons)")
        #expect(plan.text.contains("NOWHERE"))
    }

    @Test("the memory the plan has given a host counts: the third VM does not fit where two did")
    func plannedMemoryCounts() {
        let plan = DrainPlan.make(vms: Self.vms([1024, 1024, 1024]), destinations: [Self.host("b", freeMiB: 2500)])
        #expect(plan.placements.count == 2)
        #expect(plan.unplaced.map(\.vm) == ["vm2"])
        #expect(plan.unplaced.first?.reason.contains("452 MiB free") == true, "\(plan.unplaced)")
    }

    @Test("the report's exit status: 0 all moved, 1 some stayed, 3 uncertain")
    func exitStatus() {
        let plan = DrainPlan.make(vms: Self.vms([256, 256]), destinations: [Self.host("b", freeMiB: 8192)])
        func report(_ states: [DrainVMProgress.State]) -> DrainReport {
            DrainReport(host: "a", startedAt: Date(), totalSeconds: 1, plan: plan,
                        entries: states.enumerated().map { DrainReport.Entry(vm: "vm\($0.offset)", destination: "b", state: $0.element, report: nil) },
                        stopped: false)
        }
        #expect(report([.succeeded, .succeeded]).exitStatus == 0)
        #expect(report([.succeeded, .failed]).exitStatus == 1)
        #expect(report([.succeeded, .notStarted]).exitStatus == 1)
        #expect(report([.uncertain, .failed]).exitStatus == 3)
    }
}
