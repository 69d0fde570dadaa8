import FerryIO
import FerryWire
import Foundation

/// What Ferry put on a QEMU's command line (``QEMU/arguments(spec:paths:store:incoming:instance:)``),
/// read back: which VM it runs, where its files are, and the hardware it emulates. How a
/// running QEMU is found and adopted again when the VM's own files no longer say.
public struct QEMUCommandLine: Sendable, Equatable {
    public var binary: String
    public var name: String
    public var qmpSocket: String?
    public var pidFile: String?
    public var serialLog: String?
    public var memoryFile: String?
    public var ramKiB: Int?
    public var cpus: Int?
    public var accelerator: Accelerator?
    public var machine: String?
    public var cpuModel: String?
    public var kernel: String?
    public var initrd: String?
    public var append: String?
    /// Started to receive a migration (`-incoming`).
    public var incoming = false
    /// Its disks, in order, from their `-blockdev` nodes (``DiskImage/qemuArguments(_:paths:)``);
    /// the virtual sizes are not on the command line (0 here: `ferry vm repair` reads them
    /// from the images).
    public var disks: [DiskSpec] = []

    /// Nil unless `argv` is a QEMU Ferry started (`-name guest=NAME,debug-threads=on`).
    public init?(_ argv: [String]) {
        guard let binary = argv.first else { return nil }
        var name: String?
        var diskFiles: [Int: (String, Bool)] = [:]
        var diskFormats: [Int: DiskFormat] = [:]
        self.binary = binary
        self.name = ""
        var i = 1
        while i < argv.count {
            let option = argv[i]
            let value = i + 1 < argv.count ? argv[i + 1] : nil
            i += 1
            if option == "-incoming" { incoming = true }
            guard let value, option.hasPrefix("-") else { continue }
            switch option {
            case "-name": name = Self.between(value, "guest=", ",debug-threads=on")
            case "-qmp": qmpSocket = Self.between(value, "unix:", ",server=on,wait=off")
            case "-pidfile": pidFile = value
            case "-chardev": serialLog = Self.between(value, "file,id=serial0,path=", ",append=on") ?? serialLog
            case "-object":
                let prefix = "memory-backend-file,id=\(QEMU.memoryBackendID),size="
                if value.hasPrefix(prefix), let range = value.range(of: ",mem-path="), value.hasSuffix(",share=on") {
                    let path = value[range.upperBound..<value.index(value.endIndex, offsetBy: -",share=on".count)]
                    memoryFile = path.replacingOccurrences(of: ",,", with: ",")
                }
            case "-m": ramKiB = value.hasSuffix("k") ? Int(value.dropLast()) : nil
            case "-smp": cpus = Int(value)
            case "-accel": accelerator = Accelerator(rawValue: value)
            case "-machine": machine = Self.between(value, "", ",memory-backend=\(QEMU.memoryBackendID)")
            case "-cpu": cpuModel = value
            case "-kernel": kernel = value
            case "-initrd": initrd = value
            case "-append": append = value
            case "-blockdev": Self.readBlockdev(value, files: &diskFiles, formats: &diskFormats)
            default: continue
            }
            i += 1
        }
        guard let name, !name.isEmpty else { return nil }
        self.name = name
        for index in 0..<diskFiles.count {
            guard let (path, shared) = diskFiles[index], let format = diskFormats[index] else { break }
            disks.append(DiskSpec(path: path, format: format, virtualSizeBytes: 0, shared: shared))
        }
    }

    /// One of a disk's two nodes: `driver=file,filename=PATH,node-name=diskN-file|diskN-shared,...`
    /// or `driver=FORMAT,file=diskN-...,node-name=diskN,...`.
    private static func readBlockdev(_ value: String, files diskFiles: inout [Int: (String, Bool)], formats diskFormats: inout [Int: DiskFormat]) {
        guard let nodeRange = value.range(of: ",node-name=disk", options: .backwards) else { return }
        let node = value[nodeRange.upperBound...].prefix { $0 != "," }
        if value.hasPrefix("driver=file,filename=") {
            let path = value[value.index(value.startIndex, offsetBy: "driver=file,filename=".count)..<nodeRange.lowerBound]
            let parts = node.split(separator: "-")
            guard parts.count == 2, let index = Int(parts[0]), parts[1] == "file" || parts[1] == "shared" else { return }
            diskFiles[index] = (path.replacingOccurrences(of: ",,", with: ","), parts[1] == "shared")
        } else if let index = Int(node), let format = DiskFormat.allCases.first(where: { value.hasPrefix("driver=\($0.rawValue),") }) {
            diskFormats[index] = format
        }
    }

    /// `text` without `prefix` and `suffix`; nil unless it has both.
    static func between(_ text: String, _ prefix: String, _ suffix: String) -> String? {
        guard text.hasPrefix(prefix), text.hasSuffix(suffix), text.count >= prefix.count + suffix.count else { return nil }
        return String(text.dropFirst(prefix.count).dropLast(suffix.count))
    }

    /// True if this QEMU runs VM `name` of the store whose files are `vm`: it names the
    /// VM, and its pid file, QMP socket or serial log is in the VM's directory (or its RAM
    /// is the VM's file). The name alone is not enough: hosts sharing one process
    /// namespace (the lab's) each run a VM of that name from their own state root.
    public func runs(_ name: String, at vm: VMPaths) -> Bool {
        guard self.name == name else { return false }
        let directory = Self.canonical(vm.directory)
        for path in [pidFile, qmpSocket, serialLog].compactMap({ $0 }) where path.hasPrefix("/") {
            if Self.canonical((path as NSString).deletingLastPathComponent) == directory { return true }
        }
        if let memoryFile, memoryFile.hasPrefix("/"), Self.canonical(memoryFile) == Self.canonical(vm.memoryFile) { return true }
        return false
    }

    /// The spec this command line runs, given its boot files; nil if a part is missing.
    public func spec(kernel: BootFile?, initrd: BootFile?) -> VMSpec? {
        guard let ramKiB, ramKiB > 0, let cpus, let accelerator, let machine, let cpuModel else { return nil }
        // A kernel comes with its command line; a VM that boots from its disk has neither.
        guard (kernel == nil) == (append == nil), kernel != nil || !disks.isEmpty else { return nil }
        return VMSpec(name: name, memoryMiB: ramKiB / 1024, cpus: cpus, kernel: kernel, initrd: initrd, append: append ?? "",
                      accelerator: accelerator, machine: machine, cpuModel: cpuModel, ramPadKiB: ramKiB % 1024, disks: disks)
    }

    static func canonical(_ path: String) -> String {
        URL(fileURLWithPath: path).standardizedFileURL.resolvingSymlinksInPath().path
    }
}

/// A QEMU process Ferry started, found by its command line.
public struct QEMUProcess: Sendable, Equatable {
    public var pid: Int32
    public var commandLine: QEMUCommandLine

    /// Every live process on this machine whose command line is a QEMU Ferry started (any
    /// state root: ``VMStore/qemus(of:among:)`` picks a store's).
    public static func scan() -> [QEMUProcess] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        let me = getpid()
        return entries.compactMap(Int32.init).sorted().compactMap { pid in
            guard pid != me, let argv = ProcessStats.commandLine(pid: pid), argv.contains("-name"),
                  let line = QEMUCommandLine(argv), ProcessStats.isAlive(pid: pid) else { return nil }
            return QEMUProcess(pid: pid, commandLine: line)
        }
    }
}

extension VMStore {
    /// The QEMUs running VM `name` from this store, whatever its files say: found by their
    /// command lines (``QEMUCommandLine/runs(_:at:)``), among `processes` (default: a scan
    /// of /proc). Usually one; two during a same-host update.
    public func qemus(of name: String, among processes: [QEMUProcess]? = nil) -> [QEMUProcess] {
        let vm = vmPaths(name)
        return (processes ?? QEMUProcess.scan()).filter { $0.commandLine.runs(name, at: vm) }
    }

    /// The names of VMs of this store that some QEMU in `processes` runs.
    func namesRun(among processes: [QEMUProcess]) -> Set<String> {
        Set(processes.filter { VMSpec.validateName($0.commandLine.name) == nil && $0.commandLine.runs($0.commandLine.name, at: vmPaths($0.commandLine.name)) }
            .map(\.commandLine.name))
    }

    /// True if `pid` is a live QEMU running this store's VM `name` (not a reused pid, not
    /// another host's VM of the same name).
    public func ownsQEMU(pid: Int32, name: String) -> Bool {
        guard ProcessStats.isAlive(pid: pid), let argv = ProcessStats.commandLine(pid: pid),
              let line = QEMUCommandLine(argv) else { return false }
        return line.runs(name, at: vmPaths(name))
    }
}
