import ArgumentParser
import FerryIO
import FerryLab
import Foundation

struct LabCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab",
        abstract: "Two test hosts, a and b, in network namespaces joined by N veth NICs.",
        subcommands: [Up.self, Down.self, Exec.self, Addr.self, NIC.self, Show.self])

    struct LabName: ParsableArguments {
        @Option(help: "The lab's name (default: ferry); namespaces are NAME-a and NAME-b.")
        var name = "ferry"
        var lab: Lab { Lab(name: name) }
    }

    struct Up: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create the lab.")
        @Option(help: "NICs between a and b (default: 2).")
        var nics = 2
        @Option(help: "Rate of each NIC as tc writes it (1gbit, 500mbit), or one per NIC (1gbit,500mbit) (default: unlimited).")
        var rate: String?
        @OptionGroup var labName: LabName

        func validate() throws {
            guard (1...8).contains(nics) else { throw ValidationError("--nics must be between 1 and 8") }
            if let rate { do { try Lab.validateRates(rate, nics: nics) } catch { throw ValidationError("\(error)") } }
            do { try Lab.validateName(labName.name) } catch { throw ValidationError("\(error)") }
        }

        func run() throws {
            let lab = labName.lab
            try lab.up(nics: nics, rate: rate)
            print("lab \(lab.name) up: hosts a and b, \(nics) NIC(s)\(rate.map { " at \($0)" } ?? " (unlimited)")")
            for nic in 0..<nics {
                print("  \(lab.interface(nic: nic)): a \(lab.address("a", nic: nic))  <->  b \(lab.address("b", nic: nic))")
            }
        }
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
        @Argument(help: "a or b.")
        var host: String
        @Argument(parsing: .postTerminator, help: "The command.")
        var command: [String]
        @OptionGroup var labName: LabName

        func validate() throws {
            guard Lab.hosts.contains(host) else { throw ValidationError("host must be a or b") }
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
        static let configuration = CommandConfiguration(abstract: "Print a lab host's address on each NIC.")
        @Argument(help: "a or b.")
        var host: String
        @OptionGroup var labName: LabName
        func run() throws {
            guard Lab.hosts.contains(host) else { throw ValidationError("host must be a or b") }
            guard let config = labName.lab.config else { throw UserError("lab \(labName.name) is not up") }
            for nic in 0..<config.nics { print(labName.lab.address(host, nic: nic)) }
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
            guard Lab.hosts.contains(host) else { throw ValidationError("host must be a or b") }
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
            print("lab \(lab.name): \(config.nics) NIC(s)\(config.rate.map { " at \($0)" } ?? " (unlimited)"), state in \(lab.directory)")
            for nic in 0..<config.nics {
                print("  \(lab.interface(nic: nic)): a \(lab.address("a", nic: nic))  <->  b \(lab.address("b", nic: nic))")
            }
        }
    }
}

enum SelfPath {
    /// This ferry binary.
    static var executable: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// Replaces this process with `argv` (looked up in PATH).
    static func exec(_ argv: [String]) throws -> Never {
        var cargs = argv.map { strdup($0) }
        cargs.append(nil)
        execvp(argv[0], cargs)
        throw UserError("cannot run \(argv[0]): \(errnoDescription(errno))")
    }
}
