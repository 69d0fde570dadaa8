import ArgumentParser
import FerryIO
import FerryMigration
import FerryQMP
import FerryVM
import FerryWire
import Foundation

struct VM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Run, list, stop, repair and read the console of the VMs on this host.",
        subcommands: [Run.self, List.self, Stop.self, Log.self, Update.self, Repair.self])

    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Start a VM that Ferry manages; returns once it runs (QEMU stays up in the background).")

        @Argument(help: "The VM's name (letters, digits, '-', '_', '.').")
        var name: String

        @Option(help: "Guest memory, e.g. 2G or 512M (default: 512M).")
        var memory = MemorySize(mebibytes: 512)

        @Option(help: "Number of vCPUs (default: 1).")
        var cpus = 1

        @Option(help: "The guest kernel (bzImage/vmlinuz); not with --boot disk.")
        var kernel: String?

        @Option(help: "The guest initrd (optional).")
        var initrd: String?

        @Option(help: "The kernel command line (default: console=ttyS0).")
        var append: String?

        @Option(help: "What the VM boots: kernel (--kernel, --initrd, --append) or disk (its first --disk, as a BIOS would) (default: kernel).")
        var boot: BootChoice = .kernel

        @Option(help: "Accelerator: auto picks KVM where the CPU has vmx/svm, TCG otherwise (default: auto).")
        var accel: AcceleratorChoice = .auto

        @Option(name: .customLong("disk"), help: ArgumentHelp(
            "A disk: PATH[,format=qcow2|raw][,shared] (repeatable; the guest sees vda, vdb, ... in this order).",
            discussion: "The image must exist. Its format is detected and recorded (format= overrides the probe for raw). "
                + "shared: the same file is at PATH on every host (NFS, a cluster filesystem), so a migration does not copy it; "
                + "Ferry proves it is the same file before anything moves."))
        var disks: [DiskArgument] = []

        @Option(name: .customLong("nic"), help: ArgumentHelp(
            "A NIC: bridge=BRIDGE[,mac=MAC][,model=MODEL] (repeatable; the guest sees eth0, eth1, ... in this order).",
            discussion: "Its tap (fy and the MAC's hex digits) joins the host bridge BRIDGE, which must exist here and on every host "
                + "the VM migrates to. mac: six hex octets (default: 52:54:00 and three bytes from the VM's name and the NIC's place, "
                + "the same every time). model: a QEMU network device (default: virtio-net-pci)."))
        var nics: [NICArgument] = []

        @OptionGroup var host: HostOptions

        func validate() throws {
            if let problem = VMSpec.validateName(name) { throw ValidationError(problem) }
            guard (1...256).contains(cpus) else { throw ValidationError("--cpus must be between 1 and 256") }
            guard memory.mebibytes >= 16 else { throw ValidationError("--memory must be at least 16M") }
            for nic in nics {
                if let problem = nic.problem { throw ValidationError("--nic \(nic.text): \(problem)") }
            }
            switch boot {
            case .kernel:
                guard let kernel else { throw ValidationError("--kernel is needed (or --boot disk, to boot from the first --disk)") }
                guard FileManager.default.isReadableFile(atPath: kernel) else { throw ValidationError("cannot read --kernel '\(kernel)'") }
                if let initrd, !FileManager.default.isReadableFile(atPath: initrd) {
                    throw ValidationError("cannot read --initrd '\(initrd)'")
                }
            case .disk:
                guard !disks.isEmpty else { throw ValidationError("--boot disk boots from the first --disk: give one") }
                guard kernel == nil && initrd == nil && append == nil else {
                    throw ValidationError("--boot disk boots what is on the disk: --kernel, --initrd and --append do not apply")
                }
            }
        }

        func run() throws {
            let store = host.store
            let accelerator = QEMU.resolve(accel)
            if accelerator == .kvm && accel == .kvm && !HostInfo.hasHardwareVirtualization {
                throw UserError("--accel kvm: this CPU has no vmx/svm or /dev/kvm is not usable")
            }
            var diskSpecs: [DiskSpec] = []
            for disk in disks {
                guard !diskSpecs.contains(where: { $0.path == disk.path }) else { throw UserError("--disk \(disk.path) is given twice") }
                let (format, size) = try DiskImage.inspect(path: disk.path, format: disk.format)
                diskSpecs.append(DiskSpec(path: disk.path, format: format, virtualSizeBytes: size, shared: disk.shared))
            }
            var nicSpecs: [NICSpec] = []
            var taken = Set(GuestNICs.macsInUse(store: store, except: name).keys)
            for (i, nic) in nics.enumerated() {
                let model = try GuestNICs.resolveModel(nic.model ?? GuestNICs.defaultModel)
                let mac = nic.mac ?? GuestNICs.generatedMAC(vm: name, index: i, taken: taken)
                taken.insert(mac)
                nicSpecs.append(NICSpec(bridge: nic.bridge, mac: mac, model: model))
            }
            if let problem = GuestNICs.problem(nicSpecs, vm: name, store: store) { throw UserError(problem) }
            let kernelFile = try kernel.map { try store.bootFiles.importFile(at: $0) }
            let initrdFile = try initrd.map { try store.bootFiles.importFile(at: $0) }
            let spec = VMSpec(name: name, memoryMiB: memory.mebibytes, cpus: cpus, kernel: kernelFile, initrd: initrdFile,
                              append: kernel == nil ? "" : append ?? "console=ttyS0", accelerator: accelerator, machine: try QEMU.defaultMachineType(),
                              cpuModel: QEMU.defaultCPUModel(for: accelerator),
                              ramPadKiB: QEMU.tcgDirtyTrackingPadKiB(accelerator: accelerator, qemuVersion: QEMU.version()),
                              disks: diskSpecs, nics: nicSpecs)
            let (record, qmp): (VMRecord, QMPClient)
            do {
                (record, qmp) = try store.start(spec: spec, incoming: false)
            } catch VMError.exists(let name) {
                if case .damaged(let vm)? = store.entry(name) {
                    throw UserError("VM \(name) already runs here, with damaged files (\(vm.problems.joined(separator: "; "))): \(vm.advice)")
                }
                throw VMError.exists(name)
            }
            let state = try qmp.queryStatus()
            qmp.close()
            print("VM \(name) is \(state.status) (pid \(record.state.pid), \(accelerator.rawValue), \(memory.mebibytes) MiB, \(cpus) vCPU)")
            for (i, disk) in diskSpecs.enumerated() {
                print("disk \(DiskSpec.guestName(i)): \(disk.path) (\(disk.format.rawValue), \(Format.bytes(disk.virtualSizeBytes))\(disk.shared ? ", shared" : ""))")
            }
            for (i, nic) in nicSpecs.enumerated() {
                print("nic eth\(i): \(nic.mac) on bridge \(nic.bridge) (tap \(nic.tapName), \(nic.model))")
            }
            print("console: ferry vm log \(name) -f")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the VMs of this host.")

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var host: HostOptions

        func run() throws {
            // Half-done migrations a crash left are settled first, as far as this host can
            // alone (rolling back what never committed); the rest waits for `ferry serve`.
            let notes = Reconciler(store: host.store, keys: nil, logger: host.logger("ferry.vm")).reconcile(network: false)
            if !json { for note in notes { print("reconciled: \(note)") } }
            let entries = host.store.entries()
            if json {
                struct Row: Encodable {
                    var name: String, phase: String?, alive: Bool, pid: Int32?, memoryMiB: Int?, cpus: Int?, accelerator: String?
                    var migratedFrom: String?
                    /// Its NICs (bridge, MAC, model), nil if it has none.
                    var nics: [NICSpec]? = nil
                    /// Set for a damaged VM: what is wrong, and what to do.
                    var damaged: [String]?, repair: String?
                }
                let rows = entries.map { entry -> Row in
                    switch entry {
                    case .healthy(let r):
                        return Row(name: r.spec.name, phase: r.state.phase.rawValue, alive: r.alive, pid: r.state.pid,
                                   memoryMiB: r.spec.memoryMiB, cpus: r.spec.cpus, accelerator: r.spec.accelerator.rawValue,
                                   migratedFrom: r.state.migratedFrom, nics: r.spec.nics.isEmpty ? nil : r.spec.nics)
                    case .damaged(let d):
                        return Row(name: d.name, phase: d.state?.phase.rawValue, alive: !d.qemus.isEmpty, pid: d.qemus.first?.pid ?? d.state?.pid,
                                   memoryMiB: d.spec?.memoryMiB, cpus: d.spec?.cpus, accelerator: d.spec?.accelerator.rawValue,
                                   migratedFrom: d.state?.migratedFrom, damaged: d.problems, repair: d.advice)
                    }
                }
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try encoder.encode(rows), as: UTF8.self))
                return
            }
            if entries.isEmpty {
                print("no VMs on this host")
                return
            }
            print("NAME".padding(20) + "STATE".padding(16) + "PID".padding(9) + "MEMORY".padding(10) + "CPUS".padding(6) + "ACCEL".padding(7) + "FROM")
            for entry in entries {
                switch entry {
                case .healthy(let r):
                    let state = r.alive ? r.state.phase.rawValue : "dead (\(r.state.phase.rawValue))"
                    print(r.spec.name.padding(20) + state.padding(16) + "\(r.state.pid)".padding(9) + "\(r.spec.memoryMiB)M".padding(10)
                          + "\(r.spec.cpus)".padding(6) + r.spec.accelerator.rawValue.padding(7) + (r.state.migratedFrom ?? "-"))
                    for (i, nic) in r.spec.nics.enumerated() {
                        print("    nic eth\(i): \(nic.mac) on \(nic.bridge) (tap \(nic.tapName)\(GuestNICs.interfaceExists(nic.tapName) ? "" : ", missing"), \(nic.model))")
                    }
                case .damaged(let d):
                    let pids = d.qemus.isEmpty ? "-" : d.qemus.map { "\($0.pid)" }.joined(separator: ",")
                    print(d.name.padding(20) + "damaged".padding(16) + pids.padding(9) + (d.spec.map { "\($0.memoryMiB)M" } ?? "?").padding(10)
                          + (d.spec.map { "\($0.cpus)" } ?? "?").padding(6) + (d.spec?.accelerator.rawValue ?? "?").padding(7)
                          + (d.state?.migratedFrom ?? "-"))
                    for problem in d.problems { print("    damaged: \(problem)") }
                    print("    repair:  \(d.advice)")
                }
            }
        }
    }

    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop a VM and remove it from this host (its console log is kept under logs/).")

        @Argument(help: "The VM's name.")
        var name: String

        @OptionGroup var host: HostOptions

        func run() throws {
            let store = host.store
            guard let entry = store.entry(name) else { throw VMError.notFound(name) }
            let paths = store.vmPaths(name)
            // A VM whose directory is gone has no lock to take; its QEMU is stopped all the same.
            let lock = FileManager.default.fileExists(atPath: paths.directory) ? try VMLock(paths: paths, name: name) : nil
            try withExtendedLifetime(lock) { try store.stop(name, reason: entry.isDamaged ? "stopped-damaged" : "stopped") }
            print("VM \(name) stopped")
        }
    }

    struct Repair: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Adopt the QEMU of a VM whose files are damaged again (see `ferry vm list`).",
            discussion: """
                Rewrites spec.json from the command line of the QEMU that runs the VM and state.json \
                from what that QEMU reports over QMP (its pid, its run state), keeping what is still \
                readable. A damaged handover.json (a switchover's decision) is never guessed: it is \
                dropped only with --drop-handover and only while QEMU runs the guest.
                """)

        @Argument(help: "The VM's name.")
        var name: String

        @Flag(help: "Drop a damaged handover.json (kept aside as handover.json.damaged-*) if QEMU runs the guest; check first that the peer host holds no copy of the VM waiting for a decision (default: off).")
        var dropHandover = false

        @OptionGroup var host: HostOptions

        func validate() throws {
            if let problem = VMSpec.validateName(name) { throw ValidationError(problem) }
        }

        func run() throws {
            let store = host.store
            guard let entry = store.entry(name) else { throw VMError.notFound(name) }
            guard entry.isDamaged else {
                print("VM \(name) is not damaged: nothing to repair")
                return
            }
            let notes = try store.repair(name, dropHandover: dropHandover)
            for note in notes { print("\(name): \(note)") }
            if case .damaged(let still)? = store.entry(name) {
                throw UserError("VM \(name) is still damaged: \(still.problems.joined(separator: "; ")); \(still.advice)")
            }
            print("VM \(name) repaired")
        }
    }

    struct Log: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a VM's serial console.")

        @Argument(help: "The VM's name.")
        var name: String

        @Flag(name: .shortAndLong, help: "Keep printing what the guest writes (until Ctrl-C or the VM leaves).")
        var follow = false

        @OptionGroup var host: HostOptions

        func run() throws {
            let record = try host.store.record(name)
            guard let handle = FileHandle(forReadingAtPath: record.paths.serialLog) else {
                throw UserError("VM \(name) has no console log yet")
            }
            defer { try? handle.close() }
            while true {
                if let data = try handle.readToEnd(), !data.isEmpty {
                    FileHandle.standardOutput.write(data)
                }
                if !follow { return }
                if !FileManager.default.fileExists(atPath: record.paths.serialLog) { return }
                Thread.sleep(forTimeInterval: 0.1)
            }
        }
    }
}

extension String {
    func padding(_ width: Int) -> String {
        count >= width ? self + " " : self + String(repeating: " ", count: width - count)
    }
}

extension AcceleratorChoice: ExpressibleByArgument {}

extension VMEntry {
    var isDamaged: Bool {
        if case .damaged = self { return true }
        return false
    }
}

/// `--disk PATH[,format=qcow2|raw][,shared]`.
struct DiskArgument: ExpressibleByArgument {
    var path: String
    var format: DiskFormat?
    var shared = false

    init?(argument: String) {
        var parts = argument.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let first = parts.first, !first.isEmpty else { return nil }
        parts.removeFirst()
        path = URL(fileURLWithPath: first).standardizedFileURL.path
        for part in parts {
            if part == "shared" {
                shared = true
            } else if part.hasPrefix("format="), let f = DiskFormat(rawValue: String(part.dropFirst(7))) {
                format = f
            } else {
                return nil
            }
        }
    }
}

/// `--nic bridge=BR[,mac=MAC][,model=MODEL]`, checked in ``problem`` (so that the error
/// says what is wrong, not only that the value is invalid).
struct NICArgument: ExpressibleByArgument {
    var text: String
    var bridge = ""
    var mac: String?
    var model: String?
    var problem: String?

    init?(argument: String) {
        text = argument
        for part in argument.split(separator: ",", omittingEmptySubsequences: false) {
            let pair = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard pair.count == 2, !pair[1].isEmpty else {
                problem = problem ?? "'\(part)' is not KEY=VALUE (bridge=, mac= or model=)"
                continue
            }
            switch pair[0] {
            case "bridge":
                bridge = pair[1]
                if !NICSpec.validBridgeName(bridge) || bridge.contains(",") { problem = problem ?? "'\(bridge)' is not a bridge name" }
            case "mac":
                mac = NICSpec.normalizedMAC(pair[1])
                if mac == nil { problem = problem ?? "MAC '\(pair[1])' is malformed (six hex octets, aa:bb:cc:dd:ee:ff, not a multicast or the zero address)" }
            case "model":
                model = pair[1]
                if pair[1].contains(where: { $0 == "," || $0 == "=" || $0.isWhitespace }) { problem = problem ?? "'\(pair[1])' is not a model name" }
            default:
                problem = problem ?? "unknown key '\(pair[0])' (bridge=, mac= or model=)"
            }
        }
        if bridge.isEmpty { problem = problem ?? "bridge= is needed" }
    }
}

/// `--boot kernel|disk`.
enum BootChoice: String, ExpressibleByArgument, CaseIterable {
    case kernel, disk
}
