import FerryIO
import Foundation

/// `ferry lab up --libvirt`: a libvirtd on each lab host, as on two real hosts.
///
/// libvirt names one Unix socket path for both ends of a migration, and keeps its state
/// in fixed places (/etc/libvirt, /run/libvirt, /var/lib/libvirt, ...). Two of them on one
/// machine need those paths apart: each lab host gets a mount namespace of its own (kept
/// at `LAB/mnt/HOST`), in which its own directories (`LAB/HOST/libvirt/...`) are mounted
/// over libvirt's and over `/run/ferry/libvirt`, where Ferry's migration sockets go.
/// Commands run in a host (``Lab/execArguments(_:_:)``) enter its mount namespace and
/// then its network namespace; its libvirtd runs there as root (system mode), with its own
/// host UUID (there is no SMBIOS here), no cgroups, no security driver, QEMU as root, and
/// its QEMUs' logs in files (no virtlogd).
///
/// From outside the hosts, each host's libvirt directories are readable at their own
/// paths: ``socket(_:)`` is the host's libvirtd socket, which `virsh -c` can use.
public struct LabLibvirt: Sendable {
    public let lab: Lab
    public init(lab: Lab) { self.lab = lab }

    /// libvirt's directories that each host has its own of (`Lab/HOST/libvirt/<name>`).
    static let privateDirectories: [(name: String, mountPoint: String)] = [
        ("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
        ("log", "/var/log/libvirt"), ("cache", "/var/cache/libvirt"), ("ferry-run", "/run/ferry/libvirt"),
    ]

    var namespaceDirectory: String { lab.directory + "/mnt" }
    /// The file that holds `host`'s mount namespace.
    public func mountNamespace(_ host: String) -> String { namespaceDirectory + "/" + host }
    public func root(_ host: String) -> String { lab.stateDirectory(host) + "/libvirt" }
    /// `host`'s libvirtd socket, as seen from outside the lab's hosts.
    public func socket(_ host: String) -> String { root(host) + "/run/libvirt-sock" }
    /// The URI that reaches `host`'s libvirtd from outside the lab's hosts.
    public func uri(_ host: String) -> String { "qemu+unix:///system?socket=\(socket(host))" }
    /// `host`'s libvirtd log.
    public func log(_ host: String) -> String { root(host) + "/log/libvirtd.log" }
    func pidFile(_ host: String) -> String { lab.directory + "/libvirtd-\(host).pid" }
    /// The QEMU libvirt runs on every host: a wrapper that pads the guest's RAM (see ``emulatorScript``).
    public var emulator: String { lab.directory + "/qemu-system-x86_64-padded" }

    /// Whether this machine has what the lab's libvirt needs.
    public static var missing: String? {
        for (path, package) in [("/usr/sbin/libvirtd", "libvirt-daemon"), ("/usr/bin/virsh", "libvirt-clients"),
                                ("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so", "libvirt-daemon-driver-qemu")]
            where !FileManager.default.fileExists(atPath: path) {
            return "the lab's libvirt needs \(package) (apt-get install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)"
        }
        if !Command.exists("unshare") || !Command.exists("nsenter") { return "the lab's libvirt needs unshare and nsenter (util-linux)" }
        return nil
    }

    /// Makes each host's mount namespace and starts its libvirtd.
    func up(hosts: [String]) throws {
        if let missing = Self.missing { throw Lab.LabError.setup(missing) }
        let fm = FileManager.default
        // The namespace files must sit on a mount that does not propagate.
        try fm.createDirectory(atPath: namespaceDirectory, withIntermediateDirectories: true)
        try Command.check(["mount", "--bind", namespaceDirectory, namespaceDirectory])
        try Command.check(["mount", "--make-private", namespaceDirectory])
        for (_, mountPoint) in Self.privateDirectories {
            try fm.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        }
        try writeEmulator()
        // libvirtd's QEMU driver looks up its compiled-in user even when qemu.conf runs QEMU
        // as root; Debian's libvirt-daemon-system makes it, which the lab does not need.
        if (try? Command.run(["getent", "passwd", "libvirt-qemu"]))?.succeeded != true {
            try Command.check(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/var/lib/libvirt",
                               "--shell", "/usr/sbin/nologin", "libvirt-qemu"])
        }
        for host in hosts {
            for (name, _) in Self.privateDirectories {
                // As Debian makes them (QEMU, another user, passes through them).
                try fm.createDirectory(atPath: root(host) + "/" + name, withIntermediateDirectories: true,
                                       attributes: [.posixPermissions: name == "log" ? 0o700 : 0o755])
            }
            try fm.createDirectory(atPath: root(host) + "/etc/qemu", withIntermediateDirectories: true)
            try writeConfig(host)
            fm.createFile(atPath: mountNamespace(host), contents: nil)
            let mounts = Self.privateDirectories.map { "mount --bind \(root(host))/\($0.name) \($0.mountPoint)" }.joined(separator: " && ")
            try Command.check(["unshare", "--mount=\(mountNamespace(host))", "--propagation", "private", "sh", "-c", mounts])
            try startDaemon(host)
        }
        for host in hosts { try waitForDaemon(host) }
    }

    /// Stops the libvirtds and their QEMUs, and lets go of the mount namespaces.
    func down() {
        for host in Lab.hostNames {
            stopDaemon(host)
            // QEMUs of the host's domains (they outlive a libvirtd): by their pid files.
            let qemuRun = root(host) + "/run/qemu"
            for file in (try? FileManager.default.contentsOfDirectory(atPath: qemuRun)) ?? [] where file.hasSuffix(".pid") {
                if let pid = Self.pid(inFile: qemuRun + "/" + file) { ProcessStats.terminate(pid: pid, grace: .seconds(2)) }
            }
            if FileManager.default.fileExists(atPath: mountNamespace(host)) {
                _ = try? Command.run(["umount", mountNamespace(host)])
            }
        }
        _ = try? Command.run(["umount", namespaceDirectory])
    }

    /// libvirtd.conf and qemu.conf of `host`.
    private func writeConfig(_ host: String) throws {
        // A host UUID of the lab's own: its name and host, stable for the lab's life.
        let number = Lab.number(host)
        let uuid = String(format: "f0e1d2c3-0000-4000-8000-%012x", number)
        let libvirtd = """
            # ferry lab \(lab.name), host \(host)
            host_uuid = "\(uuid)"
            unix_sock_group = "root"
            unix_sock_rw_perms = "0700"
            auth_unix_ro = "none"
            auth_unix_rw = "none"
            log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
            keepalive_interval = 5
            keepalive_count = 5
            """
        // QEMU as root. As Debian runs it (user libvirt-qemu, files labelled by libvirt's DAC
        // driver, `remember_owner = 0` since the hosts share files) the libvirt tests pass
        // too, but each libvirtd then takes some 45 s to probe the lab's wrapper emulator
        // instead of 8 (seen, not explained), per host and lab: FERRY_LAB_QEMU_USER=libvirt-qemu.
        let user = ProcessInfo.processInfo.environment["FERRY_LAB_QEMU_USER"] ?? "root"
        let qemu = """
            # ferry lab \(lab.name), host \(host): QEMU as \(user), without cgroups, AppArmor
            # or a mount namespace of its own (no systemd here); logs in files.
            user = "\(user)"
            group = "\(user)"
            dynamic_ownership = \(user == "root" ? 0 : 1)
            remember_owner = 0
            security_driver = "none"
            cgroup_controllers = [ ]
            namespaces = [ ]
            stdio_handler = "file"
            """
        try Data((libvirtd + "\n").utf8).write(to: URL(fileURLWithPath: root(host) + "/etc/libvirtd.conf"))
        try Data((qemu + "\n").utf8).write(to: URL(fileURLWithPath: root(host) + "/etc/qemu.conf"))
    }

    /// QEMU 7.2 loses dirty pages of a guest whose RAM is a whole number of MiB under TCG
    /// (docs/ARCHITECTURE.md, "RAM size"), and libvirt gives RAM only in whole MiB: the
    /// lab's domains run this wrapper, which adds Ferry's 8 KiB pad to the RAM QEMU is
    /// given, the same on both hosts.
    private func writeEmulator() throws {
        let script = Self.emulatorScript(qemu: "/usr/bin/qemu-system-x86_64")
        guard FileManager.default.createFile(atPath: emulator, contents: Data(script.utf8), attributes: [.posixPermissions: 0o755]) else {
            throw Lab.LabError.setup("cannot write \(emulator)")
        }
    }

    static func emulatorScript(qemu: String) -> String {
        """
        #!/bin/bash
        # ferry lab: QEMU with the guest's RAM 8 KiB larger than libvirt asks (-m in MiB or
        # size=Nk, and a memory backend's size in bytes), so that its length is not a whole MiB.
        args=()
        pad=8192
        for a in "$@"; do
            if [[ "$prev" == "-m" && "$a" =~ ^([0-9]+)$ ]]; then
                a="$(( ${BASH_REMATCH[1]} * 1024 + pad / 1024 ))k"
            elif [[ "$prev" == "-m" && "$a" =~ ^size=([0-9]+)k(.*)$ ]]; then
                a="size=$(( ${BASH_REMATCH[1]} + pad / 1024 ))k${BASH_REMATCH[2]}"
            elif [[ "$prev" == "-object" && "$a" == *'"qom-type":"memory-backend-'* && "$a" =~ ^(.*\\"size\\":)([0-9]+)(.*)$ ]]; then
                a="${BASH_REMATCH[1]}$(( ${BASH_REMATCH[2]} + pad ))${BASH_REMATCH[3]}"
            fi
            args+=("$a")
            prev="$a"
        done
        exec \(qemu) "${args[@]}"
        """
    }

    /// `host`'s libvirtd's pid (a process inside the host's namespaces).
    public func daemonPID(_ host: String) -> Int32? { Self.pid(inFile: pidFile(host)) }

    /// The pid a pid file holds (nil: none, or not a pid).
    static func pid(inFile path: String) -> Int32? {
        (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            .flatMap { $0 > 0 ? $0 : nil }
    }

    /// Stops `host`'s libvirtd (its domains' QEMUs keep running, as with a real libvirtd).
    public func stopDaemon(_ host: String) {
        if let pid = daemonPID(host) { ProcessStats.terminate(pid: pid, grace: .seconds(5)) }
    }

    /// Starts `host`'s libvirtd again and waits until it answers.
    public func restartDaemon(_ host: String) throws {
        stopDaemon(host)
        try startDaemon(host)
        try waitForDaemon(host)
    }

    private func startDaemon(_ host: String) throws {
        let argv = ["nsenter", "--mount=\(mountNamespace(host))", "--", "ip", "netns", "exec", lab.namespace(host),
                    "/usr/sbin/libvirtd", "--config", "/etc/libvirt/libvirtd.conf", "--pid-file", "/run/libvirt/libvirtd.pid"]
        let logPath = root(host) + "/log/libvirtd.stdout"
        let pid = try Command.start("/usr/bin/nsenter", Array(argv.dropFirst()), log: logPath).processIdentifier
        try "\(pid)\n".write(toFile: pidFile(host), atomically: true, encoding: .utf8)
    }

    private func waitForDaemon(_ host: String) throws {
        // Its first start probes every QEMU binary installed (10-20 s here, more under load).
        let deadline = ContinuousClock.now + .seconds(120)
        while ContinuousClock.now < deadline {
            if (try? Command.run(["virsh", "-c", uri(host), "version"]))?.succeeded == true { return }
            usleep(200_000)
        }
        let tail = (try? String(contentsOfFile: log(host), encoding: .utf8)).map { String($0.suffix(2000)) } ?? ""
        throw Lab.LabError.setup("libvirtd on lab host \(host) did not answer within 120 s (\(log(host))): \(tail)")
    }

    /// A lab domain: the demo guest (`kernel`, `initrd`, `cmdline`) under TCG with one qcow2
    /// disk (`image`, as the host's libvirtd sees its path), a virtio NIC on the VM bridge,
    /// and its serial console appended to `console` (a path both hosts see, so that one file
    /// holds the guest's whole life across hosts), run by the lab's padding ``emulator``.
    public func domainXML(name: String, memoryMiB: Int, kernel: String, initrd: String, cmdline: String, image: String,
                          console: String, mac: String) -> String {
        """
        <domain type='qemu'>
          <name>\(name)</name>
          <memory unit='MiB'>\(memoryMiB)</memory>
          <vcpu>1</vcpu>
          <os>
            <type arch='x86_64' machine='pc'>hvm</type>
            <kernel>\(kernel)</kernel>
            <initrd>\(initrd)</initrd>
            <cmdline>\(cmdline)</cmdline>
          </os>
          <on_crash>destroy</on_crash>
          <devices>
            <emulator>\(emulator)</emulator>
            <disk type='file' device='disk'>
              <driver name='qemu' type='qcow2' cache='none'/>
              <source file='\(image)'/>
              <target dev='vda' bus='virtio'/>
            </disk>
            <interface type='bridge'>
              <source bridge='\(Lab.vmBridge)'/>
              <mac address='\(mac)'/>
              <model type='virtio'/>
            </interface>
            <serial type='file'><source path='\(console)' append='on'/><target port='0'/></serial>
            <console type='file'><source path='\(console)' append='on'/><target type='serial' port='0'/></console>
          </devices>
        </domain>
        """
    }

    /// A directory both hosts see at the same path (the lab's "shared storage"; libvirt
    /// cannot tell it is shared: migrations of its disks need `--unsafe`).
    public var sharedDirectory: String { lab.directory + "/shared" }

    /// The argv prefix that enters `host`'s mount namespace.
    func enter(_ host: String) -> [String] { ["nsenter", "--mount=\(mountNamespace(host))", "--"] }
}
