import ArgumentParser
import Foundation

/// A size in MiB: "2G", "512M", "512" (MiB), "1.5GiB".
struct MemorySize: ExpressibleByArgument, Equatable {
    var mebibytes: Int

    init(mebibytes: Int) { self.mebibytes = mebibytes }

    init?(argument: String) {
        let text = argument.trimmingCharacters(in: .whitespaces).uppercased()
        let suffixes: [(String, Double)] = [("GIB", 1024), ("MIB", 1), ("TIB", 1048576), ("G", 1024), ("M", 1), ("T", 1048576)]
        var number = Substring(text)
        var factor = 1.0
        for (suffix, f) in suffixes where text.hasSuffix(suffix) {
            number = text.dropLast(suffix.count)
            factor = f
            break
        }
        guard let value = Double(number), value > 0 else { return nil }
        let mib = value * factor
        guard mib == mib.rounded(), mib >= 1, mib <= Double(16 << 20) else { return nil }
        mebibytes = Int(mib)
    }

    var defaultValueDescription: String { "\(mebibytes)M" }
}

/// A rate: "1gbit", "500mbit" (bits per second, as tc writes them) or "100MB", "1GiB"
/// (bytes per second). Stored as bytes per second.
struct Rate: ExpressibleByArgument, Equatable {
    var bytesPerSecond: UInt64

    init?(argument: String) {
        let text = argument.lowercased().replacingOccurrences(of: "/s", with: "")
        let units: [(String, Double)] = [
            ("gbit", 1e9 / 8), ("mbit", 1e6 / 8), ("kbit", 1e3 / 8),
            ("gib", 1073741824), ("mib", 1048576), ("kib", 1024),
            ("gb", 1e9), ("mb", 1e6), ("kb", 1e3),
        ]
        for (unit, factor) in units where text.hasSuffix(unit) {
            guard let value = Double(text.dropLast(unit.count)), value > 0 else { return nil }
            bytesPerSecond = UInt64(value * factor)
            return
        }
        return nil
    }
}

/// A duration: "300ms", "5s", "2m", or a bare number of seconds.
struct DurationArgument: ExpressibleByArgument, Equatable {
    var duration: Duration

    init(_ duration: Duration) { self.duration = duration }

    init?(argument: String) {
        let text = argument.lowercased()
        let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)]
        for (unit, factor) in units where text.hasSuffix(unit) {
            guard let value = Double(text.dropLast(unit.count)), value > 0 else { return nil }
            duration = .milliseconds(Int64(value * factor * 1000))
            return
        }
        guard let seconds = Double(text), seconds > 0 else { return nil }
        duration = .milliseconds(Int64(seconds * 1000))
    }
}

/// HOST[:PORT], with [v6]:port for IPv6.
struct Endpoint: ExpressibleByArgument, Equatable {
    static let defaultPort: UInt16 = 7470
    var host: String
    var port: UInt16

    init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    init?(argument: String) {
        if argument.hasPrefix("[") {
            guard let close = argument.firstIndex(of: "]") else { return nil }
            host = String(argument[argument.index(after: argument.startIndex)..<close])
            let rest = argument[argument.index(after: close)...]
            if rest.isEmpty { port = Self.defaultPort }
            else {
                guard rest.hasPrefix(":"), let p = UInt16(rest.dropFirst()), p > 0 else { return nil }
                port = p
            }
        } else if argument.filter({ $0 == ":" }).count == 1 {
            let parts = argument.split(separator: ":", omittingEmptySubsequences: false)
            guard let p = UInt16(parts[1]), p > 0, !parts[0].isEmpty else { return nil }
            host = String(parts[0])
            port = p
        } else {
            guard !argument.isEmpty else { return nil }
            host = argument
            port = Self.defaultPort
        }
        guard !host.isEmpty, host.allSatisfy({ $0.isLetter || $0.isNumber || ".-:_".contains($0) }) else { return nil }
        if host.contains(":") {
            // A bare IPv6 literal must be one.
            var addr = in6_addr()
            guard inet_pton(AF_INET6, host, &addr) == 1 else { return nil }
        }
    }
}

import FerryInterfaces

extension NICSelection: ExpressibleByArgument {}

/// `--nic-speed eth0=1gbit,eth1=500mbit`.
struct NICSpeeds: ExpressibleByArgument {
    var speeds: [String: UInt64]
    init(speeds: [String: UInt64]) { self.speeds = speeds }
    init?(argument: String) {
        guard let parsed = SpeedList.parse(argument) else { return nil }
        speeds = parsed
    }

    /// The operator's value, else `FERRY_NIC_SPEEDS` (the lab sets it), else none.
    static func resolve(_ given: NICSpeeds?) -> [String: UInt64] {
        if let given { return given.speeds }
        if let env = ProcessInfo.processInfo.environment["FERRY_NIC_SPEEDS"], let parsed = SpeedList.parse(env) { return parsed }
        return [:]
    }
}

/// The NIC options `migrate` and `serve` share.
struct NICOptions: ParsableArguments {
    @Option(help: "NICs of this host that may carry migrations: eth0,eth1 (only these) or --nics=-eth2 (all but these) (default: $FERRY_NICS, else all).")
    var nics: NICSelection?

    /// The operator's choice, else `FERRY_NICS` (the lab leaves its VM network out with
    /// it), else every NIC.
    var selection: NICSelection {
        if let nics { return nics }
        if let text = ProcessInfo.processInfo.environment["FERRY_NICS"], let chosen = NICSelection(argument: text) { return chosen }
        return .all
    }

    @Option(name: .customLong("nic-speed"), help: "Link speeds the kernel does not report, e.g. eth0=10gbit,eth1=10gbit (default: $FERRY_NIC_SPEEDS, else the kernel's).")
    var nicSpeed: NICSpeeds?
}
