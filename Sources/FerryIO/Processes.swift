#if canImport(Glibc)
import Glibc
#endif
import CFerryLinux
import Foundation

/// Readings from /proc about a process.
public enum ProcessStats {
    /// User + system CPU seconds of `pid` (all its threads), or nil if it is gone.
    public static func cpuSeconds(pid: Int32) -> Double? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        // Fields after the command name: state is field 3, utime 14, stime 15.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let utime = Double(fields[11]), let stime = Double(fields[12]) else { return nil }
        return (utime + stime) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// How many threads `pid` runs (/proc/PID/status), or nil if it is gone.
    public static func threadCount(pid: Int32) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Threads:") }) else { return nil }
        return Int(line.dropFirst("Threads:".count).trimmingCharacters(in: .whitespaces))
    }

    /// CPU seconds of this process, from the kernel's precise clock.
    public static func ownCPUSeconds() -> Double {
        Double(ferry_process_cpu_ns()) / 1e9
    }

    /// Peak resident set size of `pid` in bytes (VmHWM), or nil.
    public static func peakRSSBytes(pid: Int32) -> UInt64? {
        statusField("VmHWM", pid: pid).map { $0 * 1024 }
    }

    /// Starts this process's peak resident set size (VmHWM) again from its current size
    /// (/proc/self/clear_refs, "5"), so that a long-running daemon can report the peak of
    /// one piece of work. False if the kernel refused.
    @discardableResult
    public static func resetPeakRSS() -> Bool {
        (try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8)) != nil
    }

    /// Current resident set size of `pid` in bytes (VmRSS), or nil.
    public static func rssBytes(pid: Int32) -> UInt64? {
        statusField("VmRSS", pid: pid).map { $0 * 1024 }
    }

    private static func statusField(_ name: String, pid: Int32) -> UInt64? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix(name + ":") {
            let digits = line.dropFirst(name.count + 1).filter(\.isNumber)
            return UInt64(digits)
        }
        return nil
    }

    /// Number of open file descriptors of `pid`.
    public static func openFileCount(pid: Int32) -> Int? {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd"))?.count
    }

    /// True if `pid` exists and is not a zombie.
    public static func isAlive(pid: Int32) -> Bool {
        guard pid > 0, kill(pid, 0) == 0 || errno == EPERM else { return false }
        if let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
           let close = stat.lastIndex(of: ")") {
            let state = stat[stat.index(close, offsetBy: 2)]
            return state != "Z" && state != "X"
        }
        return true
    }

    /// The command line of `pid`, arguments split.
    public static func commandLine(pid: Int32) -> [String]? {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return nil }
        return data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
    }

    /// Waits up to `timeout` for `pid` to exit. True if it is gone.
    public static func waitForExit(pid: Int32, timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            var status: Int32 = 0
            _ = waitpid(pid, &status, WNOHANG)  // reap it if it is our child
            if !isAlive(pid: pid) { return true }
            usleep(20_000)
        }
        return !isAlive(pid: pid)
    }

    /// Ends `pid`: SIGTERM, then SIGKILL after `grace`. True if it is gone.
    @discardableResult
    public static func terminate(pid: Int32, grace: Duration = .seconds(3)) -> Bool {
        guard isAlive(pid: pid) else { return true }
        kill(pid, SIGTERM)
        if waitForExit(pid: pid, timeout: grace) { return true }
        kill(pid, SIGKILL)
        return waitForExit(pid: pid, timeout: .seconds(5))
    }
}

/// The result of running a command to completion.
public struct CommandResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public var succeeded: Bool { status == 0 }
}

/// A failed external command, with what it printed.
public struct CommandError: Error, CustomStringConvertible, Sendable {
    public var command: [String]
    public var result: CommandResult?
    public var reason: String
    public var description: String {
        let cmd = command.joined(separator: " ")
        if let result {
            let err = result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            return "`\(cmd)` failed (exit \(result.status))" + (err.isEmpty ? "" : ": \(err)")
        }
        return "`\(cmd)` could not run: \(reason)"
    }
}

public enum Command {
    /// This process's own binary (ferry), to start another of its commands.
    public static var ownExecutable: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// Starts this binary with `arguments` in the background (``start(_:_:log:)``).
    @discardableResult
    public static func startOwn(_ arguments: [String], log: String) throws -> Process {
        try start(ownExecutable, arguments, log: log)
    }

    /// Starts `executable` with `arguments` in the background, its input /dev/null and its
    /// output into `log` (created anew); not waited for, and it outlives this process.
    public static func start(_ executable: String, _ arguments: [String], log: String) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = FileHandle(forWritingAtPath: log)
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Runs `argv` (argv[0] looked up in PATH) and collects its output.
    ///
    /// Uses posix_spawn and poll rather than Foundation's Process: a child that daemonizes
    /// (QEMU's -daemonize) must not leave us waiting on a pipe its grandchild inherited, and
    /// the child is reaped here, whatever else reaps children in this process.
    ///
    /// `passing`: descriptors of this process the child gets too, at the numbers
    /// ``childDescriptors(passing:)`` gives (what its argv names, e.g. QEMU's `fd=`). They
    /// may be close-on-exec here; the child's copies are not.
    @discardableResult
    public static func run(_ argv: [String], environment: [String: String]? = nil,
                           input: String? = nil, passing: [Int32] = []) throws(CommandError) -> CommandResult {
        var outPipe: [Int32] = [0, 0], errPipe: [Int32] = [0, 0], inPipe: [Int32] = [0, 0]
        guard pipe(&outPipe) == 0, pipe(&errPipe) == 0, pipe(&inPipe) == 0 else {
            throw CommandError(command: argv, result: nil, reason: "pipe: \(errnoDescription(errno))")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        for fd in inPipe + outPipe + errPipe { posix_spawn_file_actions_addclose(&actions, fd) }
        // Above every descriptor passed, so that no copy lands on one not yet copied.
        for (fd, number) in zip(passing, childDescriptors(passing: passing)) {
            posix_spawn_file_actions_adddup2(&actions, fd, number)
        }

        let env = (environment ?? ProcessInfo.processInfo.environment).map { "\($0.key)=\($0.value)" }
        var cArgs = argv.map { strdup($0) } + [nil]
        var cEnv = env.map { strdup($0) } + [nil]
        defer {
            cArgs.forEach { free($0) }
            cEnv.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, argv[0], &actions, nil, &cArgs, &cEnv)
        close(inPipe[0]); close(outPipe[1]); close(errPipe[1])
        guard rc == 0 else {
            close(inPipe[1]); close(outPipe[0]); close(errPipe[0])
            throw CommandError(command: argv, result: nil, reason: errnoDescription(rc))
        }
        if let input {
            let bytes = Array(input.utf8)
            _ = bytes.withUnsafeBytes { write(inPipe[1], $0.baseAddress, $0.count) }
        }
        close(inPipe[1])

        var out = [UInt8](), err = [UInt8]()
        var open: [Int32: Bool] = [outPipe[0]: true, errPipe[0]: true]
        var buffer = [UInt8](repeating: 0, count: 65536)
        var status: Int32 = 0
        var exited = false
        // Read until both pipes close, or the child has exited and its pipes stay quiet
        // (a daemonized grandchild may hold them open).
        var quietAfterExit = 0
        while open.values.contains(true) {
            var fds = open.filter(\.value).map { pollfd(fd: $0.key, events: Int16(POLLIN), revents: 0) }
            let ready = poll(&fds, nfds_t(fds.count), 50)
            if ready > 0 {
                for p in fds where p.revents != 0 {
                    let n = buffer.withUnsafeMutableBytes { read(p.fd, $0.baseAddress, $0.count) }
                    if n > 0 {
                        if p.fd == outPipe[0] { out += buffer[0..<n] } else { err += buffer[0..<n] }
                    } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                        open[p.fd] = false
                    }
                }
                quietAfterExit = 0
            } else if !exited {
                if waitpid(pid, &status, WNOHANG) == pid { exited = true }
            } else {
                quietAfterExit += 1
                if quietAfterExit >= 4 { break }
            }
        }
        close(outPipe[0]); close(errPipe[0])
        if !exited {
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        }
        let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return CommandResult(status: code, stdout: String(decoding: out, as: UTF8.self),
                             stderr: String(decoding: err, as: UTF8.self))
    }

    /// The numbers a child of ``run(_:environment:input:passing:)`` finds `fds` at: one
    /// after another, above the highest of them (and above standard error).
    public static func childDescriptors(passing fds: [Int32]) -> [Int32] {
        guard let top = fds.max() else { return [] }
        let base = max(top + 1, 3)
        return fds.indices.map { base + Int32($0) }
    }

    /// Runs `argv` and throws unless it exits 0.
    @discardableResult
    public static func check(_ argv: [String], environment: [String: String]? = nil) throws(CommandError) -> CommandResult {
        let result = try run(argv, environment: environment)
        guard result.succeeded else { throw CommandError(command: argv, result: result, reason: "exit \(result.status)") }
        return result
    }

    /// Whether `name` is an executable in PATH.
    public static func exists(_ name: String) -> Bool {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        return path.split(separator: ":").contains { access("\($0)/\(name)", X_OK) == 0 }
    }
}

public enum HostInfo {
    /// Whether the filesystem holding `path` takes O_DIRECT (tmpfs before Linux 6.6 does
    /// not, nor do some FUSE filesystems). A file that cannot be opened counts as yes: the
    /// open that matters (QEMU's) then says why.
    public static func supportsDirectIO(path: String) -> Bool {
        ferry_supports_direct_io(path) != 0
    }

    /// This host's name: `FERRY_HOST_NAME` (the lab names its hosts a and b), or the kernel's.
    public static var hostname: String {
        if let name = ProcessInfo.processInfo.environment["FERRY_HOST_NAME"], !name.isEmpty { return name }
        var buf = [CChar](repeating: 0, count: 256)
        gethostname(&buf, buf.count)
        return cString(buf)
    }

    /// True if the CPU can run KVM guests natively (vmx or svm) and /dev/kvm is usable.
    public static var hasHardwareVirtualization: Bool {
        guard let cpuinfo = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return false }
        let flags = cpuinfo.split(separator: "\n").first { $0.hasPrefix("flags") } ?? ""
        let words = Set(flags.split(separator: " "))
        return (words.contains("vmx") || words.contains("svm")) && access("/dev/kvm", R_OK | W_OK) == 0
    }

    /// Why a QEMU started here could not be a postcopy destination (it needs a
    /// userfaultfd), or nil if it can. `FERRY_TEST_NO_USERFAULTFD` makes the answer a refusal,
    /// for the tests of that refusal on hosts that have one.
    public static var postcopyProblem: String? {
        if ProcessInfo.processInfo.environment["FERRY_TEST_NO_USERFAULTFD"] == "1" {
            return "userfaultfd is not available (FERRY_TEST_NO_USERFAULTFD)"
        }
        let result = ferry_userfaultfd_check()
        guard result != 0 else { return nil }
        return "userfaultfd is not available (\(errnoDescription(-result))); see vm.unprivileged_userfaultfd and /dev/userfaultfd"
    }
}

/// This process's limit on open descriptors (RLIMIT_NOFILE, the soft one), for sizing
/// what holds a descriptor per peer; 1024 (the usual default) if it cannot be read.
public var openDescriptorLimit: Int {
    var limit = rlimit()
    guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
    return Int(clamping: limit.rlim_cur)
}

/// Runs `body` with this process's stdout (descriptor 1) pointing at its stderr, then
/// puts it back: what `body` and the child processes it starts print goes to stderr.
/// For a command whose stdout is a result to parse (`ferry bench --json`) and which runs
/// a step that prints progress (guest/build.sh). Process-wide: call it from the main
/// thread while no other thread writes to stdout.
public func withStandardOutputOnStandardError<R>(_ body: () throws -> R) rethrows -> R {
    fflush(nil)
    let saved = dup(STDOUT_FILENO)
    guard saved >= 0 else { return try body() }
    dup2(STDERR_FILENO, STDOUT_FILENO)
    defer {
        fflush(nil)
        dup2(saved, STDOUT_FILENO)
        close(saved)
    }
    return try body()
}
