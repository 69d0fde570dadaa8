import ArgumentParser
import FerryIO
import FerryLab
import Foundation

struct LabCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab",
        abstract: "Test hosts a, b (c, ... with --hosts) in network namespaces joined by N NICs, and a VM network with a client.",
        subcommands: [Up.self, Down.self, Exec.self, Addr.self, NIC.self, Show.self])

    struct LabName: ParsableArguments {
        @Option(help: "The lab's name (default: ferry); namespaces are NAME-a and NAME-b.")
        var name = "ferry"
        var lab: Lab { Lab(name: name) }
    }

    struct Up: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create the lab.")
        @Option(help: "NICs of each host (default: 2).")
        var nics = 2
        @Option(help: "Hosts: 2 (a and b, a cable per NIC) up to 8 (a to h, joined through a switch per NIC) (default: 2).")
        var hosts = 2
        @Option(help: "Rate of each NIC as tc writes it (1gbit, 500mbit), or one per NIC (1gbit,500mbit) (default: unlimited).")
        var rate: String?
        @Flag(help: "Run a libvirtd on each host (as root, in a mount namespace of the host's own, with its own host UUID and directories), for libvirt domains and `ferry migrate --libvirt`.")
        var libvirt = false
        @OptionGroup var labName: LabName

        func validate() throws {
            guard (1...8).contains(nics) else { throw ValidationError("--nics must be between 1 and 8") }
            guard (2...Lab.hostNames.count).contains(hosts) else { throw ValidationError("--hosts must be between 2 and \(Lab.hostNames.count)") }
            if let rate { do { try Lab.validateRates(rate, nics: nics) } catch { throw ValidationError("\(error)") } }
            do { try Lab.validateName(labName.name) } catch { throw ValidationError("\(error)") }
        }

        func run() throws {
            let lab = labName.lab
            try lab.up(nics: nics, rate: rate, hosts: hosts, libvirt: libvirt)
            let names = lab.hosts
            print("lab \(lab.name) up: hosts \(names.joined(separator: ", ")), \(nics) NIC(s)\(rate.map { " at \($0)" } ?? " (unlimited)")"
                  + (hosts > 2 ? ", each NIC through a switch" : ""))
            for nic in 0..<nics {
                print("  \(lab.interface(nic: nic)): " + names.map { "\($0) \(lab.address($0, nic: nic))" }.joined(separator: hosts > 2 ? "  " : "  <->  "))
            }
            printVMNetwork(lab)
            if libvirt {
                let lv = LabLibvirt(lab: lab)
                print("  libvirt: a libvirtd on " + names.map { "\($0) (virsh -c '\(lv.uri($0))')" }.joined(separator: ", ")
                      + "; domains run \(lv.emulator)")
            }
        }
    }

    static func printVMNetwork(_ lab: Lab) {
        print("  VM network: bridge \(Lab.vmBridge) on " + lab.hosts.map { "\($0) (\(lab.vmNetworkAddress($0)))" }.joined(separator: ", ") + ", "
              + "client \(lab.vmNetworkAddress(Lab.client)) (ferry lab exec client -- ...), guests from \(lab.guestAddress(0))/\(Lab.vmNetworkPrefix)")
    }

    struct Down: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop everything in the lab and remove it.")
        @OptionGroup var labName: LabName
        func run() throws {
            try labName.lab.down()
            print("lab \(labName.name) down")
        }
    }

    struct Exec: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a command on a lab host, with that host's Ferry state (ferry lab exec a -- ferry vm list).")
        @Argument(help: "a, b or client (the VM network's client).")
        var host: String
        @Argument(parsing: .postTerminator, help: "The command.")
        var command: [String]
        @OptionGroup var labName: LabName

        func validate() throws {
            guard Lab.hostNames.contains(host) || host == Lab.client else { throw ValidationError("host must be a lab host (a, b, ...) or client") }
            guard !command.isEmpty else { throw ValidationError("give a command after --") }
        }

        func run() throws {
            var cmd = command
            if cmd[0] == "ferry" { cmd[0] = SelfPath.executable }
            let argv = try labName.lab.execArguments(host, cmd)
            try SelfPath.exec(argv)
        }
    }

    struct Addr: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print lab addresses: a host's on each NIC (ferry lab addr a), on the VM network (--vm-network), a guest's (--guest N).")
        @Argument(help: "a, b or client.")
        var host: String?
        @Flag(help: "The host's (or the client's) address on the VM network.")
        var vmNetwork = false
        @Option(help: "The address lab guest number N (0-89) takes on the VM network, with its prefix (the demo guest's ferry.ip=).")
        var guest: Int?
        @OptionGroup var labName: LabName

        func validate() throws {
            if let host, !(Lab.hostNames.contains(host) || host == Lab.client) { throw ValidationError("host must be a lab host (a, b, ...) or client") }
            if host == Lab.client && !vmNetwork { throw ValidationError("the client is only on the VM network: add --vm-network") }
            if let guest, !(0...89).contains(guest) { throw ValidationError("--guest must be between 0 and 89") }
            if host == nil && guest == nil { throw ValidationError("name a host (a, b, client) or give --guest N") }
        }

        func run() throws {
            let lab = labName.lab
            guard let config = lab.config else { throw UserError("lab \(labName.name) is not up") }
            if let guest {
                print("\(lab.guestAddress(guest))/\(Lab.vmNetworkPrefix)")
            } else if let host, vmNetwork {
                print(lab.vmNetworkAddress(host))
            } else if let host {
                for nic in 0..<config.nics { print(lab.address(host, nic: nic)) }
            }
        }
    }

    struct NIC: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "nic", abstract: "Take a lab NIC down or up: ferry lab nic down a 1.")
        @Argument(help: "down or up.")
        var action: String
        @Argument(help: "a or b.")
        var host: String
        @Argument(help: "The NIC's number, from 0.")
        var nic: Int
        @OptionGroup var labName: LabName

        func validate() throws {
            guard action == "down" || action == "up" else { throw ValidationError("action must be down or up") }
            guard Lab.hostNames.contains(host) else { throw ValidationError("host must be a lab host (a, b, ...)") }
        }

        func run() throws {
            try labName.lab.setNIC(host, nic: nic, up: action == "up")
            print("\(host) \(labName.lab.interface(nic: nic)) \(action)")
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Show the lab.")
        @OptionGroup var labName: LabName
        func run() throws {
            let lab = labName.lab
            guard lab.isUp, let config = lab.config else {
                print("lab \(lab.name) is down")
                return
            }
            print("lab \(lab.name): hosts \(lab.hosts.joined(separator: ", ")), \(config.nics) NIC(s)\(config.rate.map { " at \($0)" } ?? " (unlimited)"), state in \(lab.directory)")
            for nic in 0..<config.nics {
                print("  \(lab.interface(nic: nic)): " + lab.hosts.map { "\($0) \(lab.address($0, nic: nic))" }.joined(separator: "  "))
            }
            LabCommand.printVMNetwork(lab)
        }
    }
}

enum SelfPath {
    /// This ferry binary.
    static var executable: String { Command.ownExecutable }

    /// Replaces this process with `argv` (looked up in PATH).
    static func exec(_ argv: [String]) throws -> Never {
        var cargs = argv.map { strdup($0) }
        cargs.append(nil)
        execvp(argv[0], cargs)
        throw UserError("cannot run \(argv[0]): \(errnoDescription(errno))")
    }
}
