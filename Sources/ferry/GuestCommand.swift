import ArgumentParser
import FerryIO
import FerryVM

struct Guest: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The demo guest: a Debian cloud kernel and a busybox initramfs with a self-checking memory workload.",
        subcommands: [Build.self])

    struct Build: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Build the demo guest (cached; rebuilt only when its inputs change).")

        @Option(help: "Output directory (default: $FERRY_GUEST_DIR or /var/cache/ferry/guest).")
        var out: String?

        func run() throws {
            let image = GuestImage(directory: out ?? GuestImage.defaultDirectory)
            // The build's progress to stderr; stdout is the two paths below.
            try withStandardOutputOnStandardError { try image.build() }
            print("kernel: \(image.kernel)")
            print("initrd: \(image.initrd)")
        }
    }
}
