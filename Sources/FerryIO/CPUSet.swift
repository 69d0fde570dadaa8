import CFerryLinux
import Foundation

/// The cores the data path's threads run on (`--cpus 2-5,8`), one core per channel in
/// turn, the way RSS gives each NIC queue a core: a channel's sender, receiver and
/// acknowledgement reader share one core's caches, and channels do not migrate between
/// cores under load.
public struct CPUSet: Sendable, Equatable, CustomStringConvertible {
    public let cores: [Int]

    public init(cores: [Int]) {
        precondition(!cores.isEmpty)
        self.cores = cores
    }

    /// Parses a list such as `0-3,6`: cores or ranges, comma-separated, each core once.
    public init(parsing text: String) throws(CPUSetError) {
        var cores: [Int] = []
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let bounds = part.split(separator: "-", omittingEmptySubsequences: false).map { Int($0.trimmingCharacters(in: .whitespaces)) }
            switch bounds.count {
            case 1:
                guard let core = bounds[0], core >= 0 else { throw CPUSetError("'\(part)' is not a core number") }
                cores.append(core)
            case 2:
                guard let low = bounds[0], let high = bounds[1], low >= 0, low <= high else { throw CPUSetError("'\(part)' is not a range like 2-5") }
                cores += Array(low...high)
            default:
                throw CPUSetError("'\(part)' is not a core or a range")
            }
        }
        guard !cores.isEmpty else { throw CPUSetError("no cores given") }
        guard Set(cores).count == cores.count else { throw CPUSetError("a core is listed twice in '\(text)'") }
        let online = ProcessInfo.processInfo.activeProcessorCount
        if let bad = cores.first(where: { $0 >= online }) {
            throw CPUSetError("core \(bad) does not exist (this host has cores 0-\(online - 1))")
        }
        self.cores = cores
    }

    /// The default: with 4 cores or more, the last quarter of them (at least 2), leaving
    /// the rest to QEMU's vCPU and migration threads, which the kernel spreads from core 0
    /// up; with fewer cores, none (nil): there is no core to spare, and the kernel's own
    /// balancing does better than a fixed split of two.
    public static func automatic(onlineCores: Int = ProcessInfo.processInfo.activeProcessorCount) -> CPUSet? {
        guard onlineCores >= 4 else { return nil }
        let count = max(2, onlineCores / 4)
        return CPUSet(cores: Array((onlineCores - count)..<onlineCores))
    }

    /// The core for the `index`-th channel (or stream).
    public func core(for index: Int) -> Int { cores[index % cores.count] }

    /// Pins the calling thread to the core for `index`. Returns false if the kernel refused.
    @discardableResult
    public func pinCurrentThread(index: Int) -> Bool {
        var core = Int32(core(for: index))
        return ferry_pin_thread(&core, 1) == 0
    }

    public var description: String {
        var parts: [String] = []
        var start = cores[0], previous = cores[0]
        for core in cores.dropFirst() + [-2] {
            if core == previous + 1 {
                previous = core
                continue
            }
            parts.append(start == previous ? "\(start)" : "\(start)-\(previous)")
            start = core
            previous = core
        }
        return parts.joined(separator: ",")
    }
}

public struct CPUSetError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
