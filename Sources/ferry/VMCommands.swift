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
        abstract: "Run, list, stop and read the console of the VMs on this host.",
        subcommands: [Run.self, List.self, Stop.self, Log.self, Update.self])

    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Start a VM that Ferry manages; returns once it runs (QEMU stays up in the background).")

        @Argument(help: "The VM's name (letters, digits, '-', '_', '.').")
        var name: String

        @Option(help: "Guest memory, e.g. 2G or 512M (default: 512M).")
        var memory = MemorySize(mebibytes: 512)

        @Option(help: "Number of vCPUs (default: 1).")
        var cpus = 1

        @Option(help: "The guest kernel (bzImage/vmlinuz).")
        var kernel: String

        @Option(help: "The guest initrd (optional).")
        var initrd: String?

        @Option(help: "The kernel command line (default: console=ttyS0).")
        var append = "console=ttyS0"

        @Option(help: "Accelerator: auto picks KVM where the CPU has vmx/svm, TCG otherwise (default: auto).")
        var accel: AcceleratorChoice = .auto

        @OptionGroup var host: HostOptions

        func validate() throws {
            if let problem = VMSpec.validateName(name) { throw ValidationError(problem) }
            guard (1...256).contains(cpus) else { throw ValidationError("--cpus must be between 1 and 256") }
            guard memory.mebibytes >= 16 else { throw ValidationError("--memory must be at least 16M") }
            guard FileManager.default.isReadableFile(atPath: kernel) else { throw ValidationError("cannot read --kernel '\(kernel)'") }
            if let initrd, !FileManager.default.isReadableFile(atPath: initrd) {
                throw ValidationError("cannot read --initrd '\(initrd)'")
            }
        }

        func run() throws {
            let store = host.store
            let accelerator = QEMU.resolve(accel)
            if accelerator == .kvm && accel == .kvm && !HostInfo.hasHardwareVirtualization {
                throw UserError("--accel kvm: this CPU has no vmx/svm or /dev/kvm is not usable")
            }
            let kernelFile = try store.bootFiles.importFile(at: kernel)
            let initrdFile = try initrd.map { try store.bootFiles.importFile(at: $0) }
            let spec = VMSpec(name: name, memoryMiB: memory.mebibytes, cpus: cpus, kernel: kernelFile, initrd: initrdFile,
                              append: append, accelerator: accelerator, machine: try QEMU.defaultMachineType(),
                              cpuModel: QEMU.defaultCPUModel(for: accelerator),
                              ramPadKiB: QEMU.tcgDirtyTrackingPadKiB(accelerator: accelerator, qemuVersion: QEMU.version()))
            let (record, qmp) = try store.start(spec: spec, incoming: false)
            let state = try qmp.queryStatus()
            qmp.close()
            print("VM \(name) is \(state.status) (pid \(record.state.pid), \(accelerator.rawValue), \(memory.mebibytes) MiB, \(cpus) vCPU)")
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
            let records = host.store.list()
            if json {
                struct Row: Encodable {
                    var name: String, phase: String, alive: Bool, pid: Int32, memoryMiB: Int, cpus: Int, accelerator: String
                    var migratedFrom: String?
                }
                let rows = records.map { Row(name: $0.spec.name, phase: $0.state.phase.rawValue, alive: $0.alive, pid: $0.state.pid,
                                             memoryMiB: $0.spec.memoryMiB, cpus: $0.spec.cpus,
                                             accelerator: $0.spec.accelerator.rawValue, migratedFrom: $0.state.migratedFrom) }
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try encoder.encode(rows), as: UTF8.self))
                return
            }
            if records.isEmpty {
                print("no VMs on this host")
                return
            }
            print("NAME".padding(20) + "STATE".padding(16) + "PID".padding(9) + "MEMORY".padding(10) + "CPUS".padding(6) + "ACCEL".padding(7) + "FROM")
            for r in records {
                let state = r.alive ? r.state.phase.rawValue : "dead (\(r.state.phase.rawValue))"
                print(r.spec.name.padding(20) + state.padding(16) + "\(r.state.pid)".padding(9) + "\(r.spec.memoryMiB)M".padding(10)
                      + "\(r.spec.cpus)".padding(6) + r.spec.accelerator.rawValue.padding(7) + (r.state.migratedFrom ?? "-"))
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
            let record = try store.record(name)
            let lock = try VMLock(paths: record.paths, name: name)
            try store.stop(name)
            _ = lock
            print("VM \(name) stopped")
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
