import ArgumentParser
import FerryIO

/// `--cpus`, for `migrate` and `serve`.
struct CPUOptions: ParsableArguments {
    @Option(help: "Cores for the data path's threads, one per channel in turn, e.g. 4-7 or 2,3 (default: the last quarter of the cores on hosts with 4 or more, leaving the rest to QEMU; none pinned on smaller hosts).",
            transform: { text in
                do { return try CPUSet(parsing: text) } catch { throw ValidationError("--cpus \(text): \(error)") }
            })
    var cpus: CPUSet?

    var set: CPUSet? { cpus }
}

/// `--zero-copy`.
enum ZeroCopyChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, off
}
