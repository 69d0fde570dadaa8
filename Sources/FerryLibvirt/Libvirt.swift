#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// libvirt's C library, loaded at run time (dlopen of `libvirt.so.0`), so that a host
/// without libvirt runs the rest of Ferry unchanged and `ferry migrate --libvirt` there
/// says what is missing. Only the calls Ferry makes are bound; each is looked up once.
///
/// Thread safety: libvirt's connections may be used from several threads at once (its
/// remote driver multiplexes calls), which Ferry relies on: one thread sits in
/// ``Domain/migrate(to:parameters:flags:)`` while another polls the job's statistics or
/// aborts it. libvirt keeps its last error per thread, so an error is read on the thread
/// whose call failed.
public final class Libvirt: @unchecked Sendable {
    /// The error a libvirt call reported, with libvirt's own message.
    public struct Failure: Error, CustomStringConvertible, Sendable {
        /// libvirt's error code (`virErrorNumber`: 42 no domain, 38 system error, 1 internal...).
        public let code: Int32
        public let message: String
        public var description: String { message }
        public init(code: Int32, message: String) {
            self.code = code
            self.message = message
        }
        public static let noDomain: Int32 = 42
        public static let operationInvalid: Int32 = 55
    }

    /// The library is missing or lacks a call Ferry needs.
    public struct Unavailable: Error, CustomStringConvertible, Sendable {
        public let description: String
    }

    // C signatures of the calls used (virConnectPtr, virDomainPtr and virTypedParameterPtr
    // are opaque pointers here).
    typealias OpenFn = @convention(c) (UnsafePointer<CChar>?) -> OpaquePointer?
    typealias CloseFn = @convention(c) (OpaquePointer?) -> Int32
    typealias CapabilitiesFn = @convention(c) (OpaquePointer?) -> UnsafeMutablePointer<CChar>?
    typealias LookupFn = @convention(c) (OpaquePointer?, UnsafePointer<CChar>?) -> OpaquePointer?
    typealias DomainFn = @convention(c) (OpaquePointer?) -> Int32
    typealias DomainFlagsFn = @convention(c) (OpaquePointer?, UInt32) -> Int32
    typealias StateFn = @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?, UInt32) -> Int32
    typealias XMLFn = @convention(c) (OpaquePointer?, UInt32) -> UnsafeMutablePointer<CChar>?
    typealias DefineFn = @convention(c) (OpaquePointer?, UnsafePointer<CChar>?) -> OpaquePointer?
    typealias MigrateFn = @convention(c) (OpaquePointer?, UnsafePointer<CChar>?, OpaquePointer?, Int32, UInt32) -> Int32
    typealias JobStatsFn = @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<OpaquePointer?>?,
                                           UnsafeMutablePointer<Int32>?, UInt32) -> Int32
    typealias DowntimeFn = @convention(c) (OpaquePointer?, UInt64, UInt32) -> Int32
    typealias AddStringFn = @convention(c) (UnsafeMutablePointer<OpaquePointer?>?, UnsafeMutablePointer<Int32>?,
                                            UnsafeMutablePointer<Int32>?, UnsafePointer<CChar>?, UnsafePointer<CChar>?) -> Int32
    typealias AddIntFn = @convention(c) (UnsafeMutablePointer<OpaquePointer?>?, UnsafeMutablePointer<Int32>?,
                                         UnsafeMutablePointer<Int32>?, UnsafePointer<CChar>?, Int32) -> Int32
    typealias GetULLongFn = @convention(c) (OpaquePointer?, Int32, UnsafePointer<CChar>?, UnsafeMutablePointer<UInt64>?) -> Int32
    typealias FreeParamsFn = @convention(c) (OpaquePointer?, Int32) -> Void
    typealias LastErrorFn = @convention(c) () -> UnsafeMutableRawPointer?
    typealias VersionFn = @convention(c) (UnsafeMutablePointer<UInt>?, UnsafePointer<CChar>?, UnsafeMutablePointer<UInt>?) -> Int32
    typealias InitializeFn = @convention(c) () -> Int32
    typealias ErrorHandler = @convention(c) (UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> Void
    typealias SetErrorFuncFn = @convention(c) (UnsafeMutableRawPointer?, ErrorHandler?) -> Void

    let open: OpenFn
    let close: CloseFn
    let capabilities: CapabilitiesFn
    let lookup: LookupFn
    let free: DomainFn
    let getState: StateFn
    let getXML: XMLFn
    let define: DefineFn
    let create: DomainFn
    let destroy: DomainFn
    let undefine: DomainFn
    let migrate: MigrateFn
    let jobStats: JobStatsFn
    let abortJob: DomainFn
    let setDowntime: DowntimeFn
    let addString: AddStringFn
    let addInt: AddIntFn
    let getULLong: GetULLongFn
    let freeParams: FreeParamsFn
    let lastError: LastErrorFn
    let version: VersionFn

    /// The library's soname (Debian: libvirt0).
    public static let soname = "libvirt.so.0"

    /// Loads libvirt once per process; the error says what to install when it is missing.
    public static func load() throws(Unavailable) -> Libvirt {
        try loaded.get()
    }

    private static let loaded: Result<Libvirt, Unavailable> = {
        guard let handle = dlopen(soname, RTLD_NOW | RTLD_LOCAL) else {
            let why = dlerror().map { String(cString: $0) } ?? "not found"
            return .failure(Unavailable(description: "libvirt is not installed on this host (\(why)); apt-get install libvirt0 (and libvirt-daemon-driver-qemu where domains run)"))
        }
        do throws(Unavailable) {
            return .success(try Libvirt(handle: handle))
        } catch {
            return .failure(error)
        }
    }()

    private init(handle: UnsafeMutableRawPointer) throws(Unavailable) {
        func bind<T>(_ name: String, _: T.Type) throws(Unavailable) -> T {
            guard let symbol = dlsym(handle, name) else {
                throw Unavailable(description: "this host's libvirt lacks \(name) (Ferry needs libvirt 6.8 or later)")
            }
            return unsafeBitCast(symbol, to: T.self)
        }
        open = try bind("virConnectOpen", OpenFn.self)
        close = try bind("virConnectClose", CloseFn.self)
        capabilities = try bind("virConnectGetCapabilities", CapabilitiesFn.self)
        lookup = try bind("virDomainLookupByName", LookupFn.self)
        free = try bind("virDomainFree", DomainFn.self)
        getState = try bind("virDomainGetState", StateFn.self)
        getXML = try bind("virDomainGetXMLDesc", XMLFn.self)
        define = try bind("virDomainDefineXML", DefineFn.self)
        create = try bind("virDomainCreate", DomainFn.self)
        destroy = try bind("virDomainDestroy", DomainFn.self)
        undefine = try bind("virDomainUndefine", DomainFn.self)
        migrate = try bind("virDomainMigrateToURI3", MigrateFn.self)
        jobStats = try bind("virDomainGetJobStats", JobStatsFn.self)
        abortJob = try bind("virDomainAbortJob", DomainFn.self)
        setDowntime = try bind("virDomainMigrateSetMaxDowntime", DowntimeFn.self)
        addString = try bind("virTypedParamsAddString", AddStringFn.self)
        addInt = try bind("virTypedParamsAddInt", AddIntFn.self)
        getULLong = try bind("virTypedParamsGetULLong", GetULLongFn.self)
        freeParams = try bind("virTypedParamsFree", FreeParamsFn.self)
        lastError = try bind("virGetLastError", LastErrorFn.self)
        version = try bind("virGetVersion", VersionFn.self)
        // Once, before any thread calls libvirt (its own lazy initialisation is not safe
        // against two first calls at once).
        let initialize = try bind("virInitialize", InitializeFn.self)
        guard initialize() == 0 else { throw Unavailable(description: "libvirt failed to initialise") }
        // libvirt prints every error to stderr unless told otherwise; Ferry reports them itself.
        let setErrorFunc = try bind("virSetErrorFunc", SetErrorFuncFn.self)
        setErrorFunc(nil, { _, _ in })
    }

    /// libvirt's version as major.minor.release.
    public var libraryVersion: String {
        var v: UInt = 0
        guard version(&v, nil, nil) == 0 else { return "?" }
        return "\(v / 1_000_000).\(v / 1000 % 1000).\(v % 1000)"
    }

    /// The calling thread's last libvirt error (`virError`: code at 0, message at 8).
    func failure(_ doing: String) -> Failure {
        guard let error = lastError() else { return Failure(code: 1, message: "\(doing) failed (libvirt gave no reason)") }
        let code = error.load(as: Int32.self)
        let message = error.load(fromByteOffset: 8, as: UnsafePointer<CChar>?.self).map { String(cString: $0) }
        return Failure(code: code, message: message ?? "\(doing) failed (libvirt gave no reason)")
    }

    /// A connection to a libvirt daemon (`qemu:///system`, `qemu+unix:///system?socket=...`,
    /// `test:///default`).
    public func connect(_ uri: String) throws(Failure) -> Connection {
        guard let pointer = open(uri) else { throw failure("connecting to \(uri)") }
        return Connection(libvirt: self, pointer: pointer, uri: uri)
    }

    public final class Connection: @unchecked Sendable {
        let libvirt: Libvirt
        let pointer: OpaquePointer
        public let uri: String
        init(libvirt: Libvirt, pointer: OpaquePointer, uri: String) {
            self.libvirt = libvirt
            self.pointer = pointer
            self.uri = uri
        }
        deinit { _ = libvirt.close(pointer) }

        /// The host's capabilities (`virConnectGetCapabilities`), XML.
        public func capabilities() throws(Failure) -> String {
            guard let text = libvirt.capabilities(pointer) else { throw libvirt.failure("reading the host's capabilities") }
            defer { Glibc.free(text) }
            return String(cString: text)
        }

        /// The user and group QEMU runs as under this libvirtd (its DAC security model's base
        /// label, `+UID:+GID`); nil when libvirt does not say or says root.
        public func qemuOwner() -> (uid: UInt32, gid: UInt32)? {
            guard let xml = try? capabilities() else { return nil }
            return Self.qemuOwner(capabilities: xml)
        }

        static func qemuOwner(capabilities xml: String) -> (uid: UInt32, gid: UInt32)? {
            // <secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+64055</baselabel>...
            guard let dac = xml.range(of: "<model>dac</model>") else { return nil }
            let rest = xml[dac.upperBound...]
            let end = rest.range(of: "</secmodel>")?.lowerBound ?? rest.endIndex
            for type in ["qemu", "kvm"] {
                guard let open = rest[..<end].range(of: "<baselabel type='\(type)'>"),
                      let close = rest[open.upperBound..<end].range(of: "</baselabel>") else { continue }
                let label = rest[open.upperBound..<close.lowerBound].replacingOccurrences(of: "+", with: "")
                let parts = label.split(separator: ":")
                guard parts.count == 2, let uid = UInt32(parts[0]), let gid = UInt32(parts[1]) else { continue }
                return uid == 0 && gid == 0 ? nil : (uid, gid)
            }
            return nil
        }

        /// The domain called `name`; libvirt's error (code ``Failure/noDomain``) if none.
        public func domain(_ name: String) throws(Failure) -> Domain {
            guard let domain = libvirt.lookup(pointer, name) else { throw libvirt.failure("looking up domain \(name)") }
            return Domain(libvirt: libvirt, pointer: domain, name: name, connection: self)
        }

        /// Defines a persistent domain from its XML.
        @discardableResult
        public func define(xml: String) throws(Failure) -> Domain {
            guard let domain = libvirt.define(pointer, xml) else { throw libvirt.failure("defining a domain") }
            let name = (try? Domain.name(inXML: xml)) ?? "?"
            return Domain(libvirt: libvirt, pointer: domain, name: name, connection: self)
        }
    }

    /// A domain's state (`virDomainState`).
    public enum State: Int32, Sendable, CustomStringConvertible {
        case noState = 0, running, blocked, paused, shutdown, shutoff, crashed, suspended
        public var description: String {
            switch self {
            case .noState: return "no state"
            case .running: return "running"
            case .blocked: return "blocked"
            case .paused: return "paused"
            case .shutdown: return "shutting down"
            case .shutoff: return "shut off"
            case .crashed: return "crashed"
            case .suspended: return "suspended by power management"
            }
        }
    }

    public final class Domain: @unchecked Sendable {
        let libvirt: Libvirt
        let pointer: OpaquePointer
        public let name: String
        /// Kept: a domain must not outlive its connection.
        let connection: Connection
        init(libvirt: Libvirt, pointer: OpaquePointer, name: String, connection: Connection) {
            self.libvirt = libvirt
            self.pointer = pointer
            self.name = name
            self.connection = connection
        }
        deinit { _ = libvirt.free(pointer) }

        public func state() throws(Failure) -> State {
            var state: Int32 = 0, reason: Int32 = 0
            guard libvirt.getState(pointer, &state, &reason, 0) == 0 else { throw libvirt.failure("reading \(name)'s state") }
            return State(rawValue: state) ?? .noState
        }

        /// The domain's XML as it runs (flags 0) or as defined (`VIR_DOMAIN_XML_INACTIVE` = 2).
        public func xml(inactive: Bool = false) throws(Failure) -> String {
            guard let text = libvirt.getXML(pointer, inactive ? 2 : 0) else { throw libvirt.failure("reading \(name)'s XML") }
            defer { Glibc.free(text) }
            return String(cString: text)
        }

        public func start() throws(Failure) {
            guard libvirt.create(pointer) == 0 else { throw libvirt.failure("starting \(name)") }
        }

        public func destroy() throws(Failure) {
            guard libvirt.destroy(pointer) == 0 else { throw libvirt.failure("stopping \(name)") }
        }

        public func undefine() throws(Failure) {
            guard libvirt.undefine(pointer) == 0 else { throw libvirt.failure("undefining \(name)") }
        }

        /// Peer-to-peer migration to the libvirtd at `destination` (`virDomainMigrateToURI3`).
        /// Blocks until libvirt has finished or failed it.
        public func migrate(to destination: String, parameters: MigrationParameters, flags: MigrationFlags) throws(Failure) {
            var list = TypedParameters(libvirt: libvirt)
            defer { list.free() }
            for (key, value) in parameters.strings { list.add(key, value) }
            for (key, value) in parameters.ints { list.add(key, value) }
            guard libvirt.migrate(pointer, destination, list.params, list.count, flags.rawValue) == 0 else {
                throw libvirt.failure("migrating \(name)")
            }
        }

        /// The running job's statistics (nil when there is no job, or libvirt says nothing).
        /// `completed`: the statistics of the job that has just completed (`VIR_DOMAIN_JOB_STATS_COMPLETED`).
        public func jobStatistics(completed: Bool = false) -> JobStatistics? {
            var type: Int32 = 0
            var params: OpaquePointer?
            var count: Int32 = 0
            // COMPLETED (1) with KEEP_COMPLETED (2): reading them must not clear them for others.
            guard libvirt.jobStats(pointer, &type, &params, &count, completed ? 3 : 0) == 0 else { return nil }
            defer { libvirt.freeParams(params, count) }
            func value(_ key: String) -> UInt64? {
                var v: UInt64 = 0
                return libvirt.getULLong(params, count, key, &v) == 1 ? v : nil
            }
            return JobStatistics(
                type: type,
                elapsedMilliseconds: value("time_elapsed"),
                dataTotal: value("data_total"), dataProcessed: value("data_processed"), dataRemaining: value("data_remaining"),
                memoryTotal: value("memory_total"), memoryProcessed: value("memory_processed"), memoryRemaining: value("memory_remaining"),
                memoryBytesPerSecond: value("memory_bps"), memoryDirtyRate: value("memory_dirty_rate"),
                memoryIteration: value("memory_iteration"),
                diskTotal: value("disk_total"), diskProcessed: value("disk_processed"), diskRemaining: value("disk_remaining"),
                downtimeMilliseconds: value("downtime"), setupMilliseconds: value("setup_time"))
        }

        /// Aborts the domain's running job (a migration: the domain stays here).
        public func abortJob() throws(Failure) {
            guard libvirt.abortJob(pointer) == 0 else { throw libvirt.failure("aborting \(name)'s job") }
        }

        public func setMaxDowntime(milliseconds: UInt64) throws(Failure) {
            guard libvirt.setDowntime(pointer, milliseconds, 0) == 0 else { throw libvirt.failure("setting \(name)'s downtime") }
        }

        /// The `<name>` of a domain's XML.
        static func name(inXML xml: String) throws -> String {
            guard let start = xml.range(of: "<name>"), let end = xml.range(of: "</name>", range: start.upperBound..<xml.endIndex) else {
                throw Failure(code: 1, message: "the XML has no <name>")
            }
            return String(xml[start.upperBound..<end.lowerBound])
        }
    }

    /// A virTypedParameter list built with libvirt's own helpers (they own its memory).
    struct TypedParameters {
        let libvirt: Libvirt
        var params: OpaquePointer?
        var count: Int32 = 0
        var capacity: Int32 = 0
        init(libvirt: Libvirt) { self.libvirt = libvirt }
        mutating func add(_ key: String, _ value: String) { _ = libvirt.addString(&params, &count, &capacity, key, value) }
        mutating func add(_ key: String, _ value: Int32) { _ = libvirt.addInt(&params, &count, &capacity, key, value) }
        mutating func free() {
            if params != nil { libvirt.freeParams(params, count) }
            params = nil
        }
    }
}

/// `virDomainMigrateFlags`, the ones Ferry sets.
public struct MigrationFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let live = MigrationFlags(rawValue: 1 << 0)
    public static let peerToPeer = MigrationFlags(rawValue: 1 << 1)
    public static let persistDestination = MigrationFlags(rawValue: 1 << 3)
    public static let undefineSource = MigrationFlags(rawValue: 1 << 4)
    public static let nonSharedDisk = MigrationFlags(rawValue: 1 << 6)
    /// Migrate even where libvirt cannot tell that the storage is shared (a disk on a
    /// filesystem it does not know as shared).
    public static let unsafe = MigrationFlags(rawValue: 1 << 9)
    public static let autoConverge = MigrationFlags(rawValue: 1 << 13)
    public static let postcopy = MigrationFlags(rawValue: 1 << 15)
    public static let parallel = MigrationFlags(rawValue: 1 << 17)
}

/// `VIR_MIGRATE_PARAM_*` values for ``Libvirt/Domain/migrate(to:parameters:flags:)``.
public struct MigrationParameters: Sendable {
    public var strings: [(String, String)] = []
    public var ints: [(String, Int32)] = []
    public init() {}

    /// `migrate_uri`: where the source QEMU sends its streams.
    public var uri: String? {
        get { strings.first { $0.0 == "migrate_uri" }?.1 }
        set { set("migrate_uri", newValue) }
    }
    /// `disks_uri`: where the disks are copied to (the destination's NBD server).
    public var disksURI: String? {
        get { strings.first { $0.0 == "disks_uri" }?.1 }
        set { set("disks_uri", newValue) }
    }
    /// `parallel.connections`: QEMU's multifd channels (with ``MigrationFlags/parallel``).
    public var parallelConnections: Int32? {
        get { ints.first { $0.0 == "parallel.connections" }?.1 }
        set {
            ints.removeAll { $0.0 == "parallel.connections" }
            if let newValue { ints.append(("parallel.connections", newValue)) }
        }
    }

    private mutating func set(_ key: String, _ value: String?) {
        strings.removeAll { $0.0 == key }
        if let value { strings.append((key, value)) }
    }
}

/// A job's statistics (`virDomainGetJobStats`), bytes unless named otherwise.
public struct JobStatistics: Sendable, Equatable {
    /// `virDomainJobType`: 0 none, 1 bounded, 2 unbounded, 3 completed, 4 failed, 5 cancelled.
    public var type: Int32
    public var elapsedMilliseconds: UInt64?
    public var dataTotal: UInt64?
    public var dataProcessed: UInt64?
    public var dataRemaining: UInt64?
    public var memoryTotal: UInt64?
    public var memoryProcessed: UInt64?
    public var memoryRemaining: UInt64?
    public var memoryBytesPerSecond: UInt64?
    public var memoryDirtyRate: UInt64?
    public var memoryIteration: UInt64?
    public var diskTotal: UInt64?
    public var diskProcessed: UInt64?
    public var diskRemaining: UInt64?
    public var downtimeMilliseconds: UInt64?
    public var setupMilliseconds: UInt64?
    /// A job is running (bounded or unbounded).
    public var isActive: Bool { type == 1 || type == 2 }
}
