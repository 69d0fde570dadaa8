import FerryIO
import FerryQMP
import FerryWire
import Foundation

/// How Ferry starts QEMU. Both ends of a migration build the command line from the same
/// ``VMSpec``, so the destination emulates exactly the hardware the source has.
public enum QEMU {
    /// The QEMU binary: `FERRY_QEMU`, or qemu-system-x86_64 from PATH.
    public static var binary: String {
        ProcessInfo.processInfo.environment["FERRY_QEMU"] ?? "qemu-system-x86_64"
    }

    /// KVM where the CPU has vmx/svm (and /dev/kvm works), TCG otherwise.
    public static func resolve(_ choice: AcceleratorChoice) -> Accelerator {
        switch choice {
        case .kvm: return .kvm
        case .tcg: return .tcg
        case .auto: return HostInfo.hasHardwareVirtualization ? .kvm : .tcg
        }
    }

    /// The CPU model for an accelerator: the host's CPU under KVM (clusters migrate
    /// between like hosts), QEMU's portable default under TCG.
    public static func defaultCPUModel(for accelerator: Accelerator) -> String {
        accelerator == .kvm ? "host" : "qemu64"
    }

    private static let machineCache = Locked<String?>(nil)

    /// The versioned machine type behind QEMU's default `pc` alias (e.g. pc-i440fx-7.2).
    public static func defaultMachineType() throws -> String {
        if let cached = machineCache.current { return cached }
        let result: CommandResult
        do {
            result = try Command.check([binary, "-machine", "help"])
        } catch {
            throw VMError.qemu("cannot run QEMU (\(binary)); is qemu-system-x86 installed? \(error)")
        }
        for line in result.stdout.split(separator: "\n") where line.hasPrefix("pc ") {
            if let range = line.range(of: "alias of ") {
                let type = line[range.upperBound...].prefix { $0 != ")" }
                machineCache.withLock { $0 = String(type) }
                return String(type)
            }
        }
        throw VMError.qemu("cannot find the default machine type in `\(binary) -machine help`")
    }

    /// Extra guest RAM that keeps QEMU before 9.0 from losing pages under TCG.
    ///
    /// QEMU up to 8.2 has a bug in TCG dirty tracking: when a RAM block's length is a
    /// multiple of 64 pages (256 KiB), `cpu_physical_memory_sync_dirty_bitmap` takes a
    /// word-at-a-time fast path that clears the migration bitmap without resetting the
    /// vCPUs' TLB dirty state, so later guest writes through those TLB entries are never
    /// marked dirty and never sent. The destination guest then finds stale pages (our
    /// workload reports them; a kernel oopses). Fixed upstream in QEMU 9.0 ("physmem: Fix
    /// migration dirty bitmap coherency with TCG memory access", N. Piggin, March 2024).
    /// On these lab machines QEMU 7.2 alone broke 3 of 8 migrations of a guest dirtying
    /// 16 MiB/s with `-m 384M`, and 0 of 8 with `-m 393224k` (8 KiB more): a length that is
    /// not a multiple of 256 KiB sends QEMU down its correct slow path. KVM tracks dirty
    /// pages in the kernel and is not affected.
    public static func tcgDirtyTrackingPadKiB(accelerator: Accelerator, qemuVersion: String) -> Int {
        guard accelerator == .tcg else { return 0 }
        let major = Int(qemuVersion.split(separator: ".").first ?? "") ?? 0
        return major > 0 && major < 9 ? 8 : 0
    }

    /// QEMU's version string, e.g. "7.2.15".
    public static func version() -> String {
        guard let out = try? Command.check([binary, "--version"]).stdout else { return "unknown" }
        let first = out.split(separator: "\n").first ?? ""
        return first.split(separator: " ").dropFirst(3).first.map(String.init) ?? String(first)
    }

    /// The id of the guest RAM's memory backend on QEMU's command line.
    static let memoryBackendID = "ferry-ram"

    /// Guest RAM in KiB: the spec's memory plus the TCG pad. `-m` and the memory backend's
    /// `size` must be equal, and the pad must be kept (see ``tcgDirtyTrackingPadKiB``).
    public static func ramKiB(_ spec: VMSpec) -> Int { spec.memoryMiB * 1024 + spec.ramPadKiB }

    /// The command line for `spec`. `incoming`: start paused, waiting for a migration.
    ///
    /// Guest RAM is a `memory-backend-file` on tmpfs with `share=on` (`paths.memoryFile`),
    /// not QEMU's anonymous memory: a second QEMU can map the same file, and QEMU's
    /// `x-ignore-shared` migration capability then leaves that RAM out of the stream, which
    /// is what makes a same-host update independent of the VM's size. Network migrations
    /// leave the capability off and send RAM as before. `instance` picks the binary and the
    /// QMP socket and pid file (default: the VM's own).
    /// `tapFDs`: the descriptor QEMU finds each NIC's tap at (``GuestNICs``).
    public static func arguments(spec: VMSpec, paths: VMPaths, store: BootFileStore, incoming: Bool,
                                 instance: QEMUInstance? = nil, tapFDs: [Int32] = []) -> [String] {
        let instance = instance ?? QEMUInstance(paths)
        let ram = ramKiB(spec)
        var argv = [
            instance.binary,
            "-name", "guest=\(spec.name),debug-threads=on",
            "-machine", "\(spec.machine),memory-backend=\(memoryBackendID)",
            "-accel", spec.accelerator.rawValue,
            "-cpu", spec.cpuModel,
            "-object", "memory-backend-file,id=\(memoryBackendID),size=\(ram)k,mem-path=\(optionValue(paths.memoryFile)),share=on",
            "-m", "\(ram)k",
            "-smp", "\(spec.cpus)",
            "-nodefaults", "-no-user-config", "-display", "none",
        ]
        if let kernel = spec.kernel {
            argv += ["-kernel", store.path(of: kernel)]
            if let initrd = spec.initrd { argv += ["-initrd", store.path(of: initrd)] }
            argv += ["-append", spec.append]
        }
        argv += [
            "-chardev", "file,id=serial0,path=\(paths.serialLog),append=on",
            "-serial", "chardev:serial0",
            "-qmp", "unix:\(instance.qmpSocket),server=on,wait=off",
            "-pidfile", instance.pidFile,
            "-daemonize",
        ]
        argv += DiskImage.qemuArguments(spec.disks, bootFromDisk: spec.kernel == nil)
        argv += GuestNICs.qemuArguments(spec.nics, fds: tapFDs)
        if incoming { argv += ["-S", "-incoming", "defer"] }
        return argv
    }

    /// A value inside a QEMU `key=value,...` option: a comma is written twice.
    static func optionValue(_ text: String) -> String { text.replacingOccurrences(of: ",", with: ",,") }

    /// Starts QEMU in the background and returns its pid and a QMP connection.
    /// QEMU's `-daemonize` makes the VM independent of the process that started it.
    /// `taps`: the NICs' taps, one per NIC of the spec (QEMU inherits them; the caller
    /// closes its own copies afterwards).
    public static func launch(spec: VMSpec, paths: VMPaths, store: BootFileStore, incoming: Bool,
                              instance: QEMUInstance? = nil, taps: TapSet? = nil) throws -> (Int32, QMPClient) {
        let instance = instance ?? QEMUInstance(paths)
        for file in spec.bootFiles where !store.has(file) {
            throw VMError.badInput("boot file \(file.name) (\(file.sha256.prefix(12))) is not in the store")
        }
        let tapFDs = taps?.fds ?? []
        guard tapFDs.count == spec.nics.count else {
            throw VMError.badInput("VM '\(spec.name)' has \(spec.nics.count) NICs and \(tapFDs.count) taps to give its QEMU")
        }
        try? FileManager.default.removeItem(atPath: instance.pidFile)
        try? FileManager.default.removeItem(atPath: instance.qmpSocket)
        let argv = arguments(spec: spec, paths: paths, store: store, incoming: incoming, instance: instance,
                             tapFDs: Command.childDescriptors(passing: tapFDs))
        // With -daemonize the parent exits once the VM is set up; errors before that go to
        // its stderr, which we keep in qemu.log.
        let result: CommandResult
        do {
            result = try Command.run(argv, passing: tapFDs)
        } catch {
            throw VMError.qemu("cannot start QEMU (\(instance.binary)): \(error)")
        }
        let log = "$ " + argv.joined(separator: " ") + "\n" + result.stdout + result.stderr
        try? log.write(toFile: instance.log ?? paths.qemuLog, atomically: true, encoding: .utf8)
        guard result.succeeded else {
            let err = result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            throw VMError.qemu("QEMU failed to start VM '\(spec.name)' (exit \(result.status)): \(err)")
        }
        guard let pidText = try? String(contentsOfFile: instance.pidFile, encoding: .utf8),
              let pid = Int32(pidText.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw VMError.qemu("\(instance.binary) exited without starting a VM (no pid file at \(instance.pidFile)); is it QEMU?")
        }
        do {
            let qmp = try QMPClient(path: instance.qmpSocket)
            return (pid, qmp)
        } catch {
            ProcessStats.terminate(pid: pid)
            throw VMError.qemu("QEMU (pid \(pid)) started but QMP does not answer: \(error)")
        }
    }
}

/// One QEMU process of a VM: its binary and where it listens and writes its pid. A VM has
/// one, except during a same-host update, when its successor runs beside it.
public struct QEMUInstance: Sendable, Equatable {
    public var binary: String
    public var qmpSocket: String
    public var pidFile: String
    /// Where QEMU's start-up messages go (nil: the VM's qemu.log).
    public var log: String?

    /// The VM's own: `qmp.sock`, `qemu.pid`, the binary from ``QEMU/binary``.
    public init(_ paths: VMPaths, binary: String = QEMU.binary) {
        self.binary = binary
        qmpSocket = paths.qmpSocket
        pidFile = paths.pidFile
        log = nil
    }

    /// A successor for a same-host update: its own QMP socket and pid file, named by `tag`.
    public static func successor(_ paths: VMPaths, binary: String, tag: String) -> QEMUInstance {
        var instance = QEMUInstance(paths, binary: binary)
        instance.qmpSocket = paths.successorQMPSocket(tag: tag)
        instance.pidFile = paths.successorPIDFile(tag: tag)
        instance.log = paths.directory + "/qemu-\(tag).log"
        return instance
    }
}

/// `--accel`: which accelerator to ask for.
public enum AcceleratorChoice: String, CaseIterable, Sendable {
    case auto, kvm, tcg
}

extension QEMU {
    /// Ends a QEMU: `quit` over `qmp` if given, up to `grace` for it to exit, then signals
    /// (``ProcessStats/terminate(pid:grace:)``). True once it is gone.
    @discardableResult
    public static func stop(pid: Int32, qmp: QMPClient?, grace: Duration = .seconds(5)) -> Bool {
        try? qmp?.quit()
        return ProcessStats.waitForExit(pid: pid, timeout: grace) || ProcessStats.terminate(pid: pid)
    }

    /// The same, reaching QEMU through its QMP socket at `path` (a client of its own).
    @discardableResult
    public static func stop(pid: Int32, qmpSocket path: String, grace: Duration = .seconds(5)) -> Bool {
        let qmp = try? QMPClient(path: path, timeout: .seconds(3))
        defer { qmp?.close() }
        return stop(pid: pid, qmp: qmp, grace: grace)
    }
}
