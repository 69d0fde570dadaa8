import FerryWire
import Foundation

/// The files in which a host keeps what it knows (docs/ARCHITECTURE.md, "Damaged state
/// files"). Each is read only through ``StateFileCoding``, which takes a file for the
/// record it should be only if it decodes *and* keeps that record's rules.
public enum StateFileKind: String, Sendable, CaseIterable, Codable {
    /// `vms/NAME/spec.json`: ``VMSpec``.
    case spec = "spec.json"
    /// `vms/NAME/state.json`: ``VMState``.
    case state = "state.json"
    /// `vms/NAME/handover.json`: ``HandoverRecord``.
    case handover = "handover.json"
    /// `run/incoming.json`: ``IncomingMigrations``.
    case incoming = "incoming.json"
}

/// Why a state file that exists cannot be trusted: not JSON, not the record it should be,
/// or a record that breaks its own rules (a pid of 0, a spec naming another VM, ...).
public struct StateFileProblem: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// A state file that exists and cannot be trusted, and why.
public struct StateFileDamage: Error, Sendable, Equatable, CustomStringConvertible, Codable {
    public var file: StateFileKind
    public var path: String
    public var problem: String
    public init(file: StateFileKind, path: String, problem: String) {
        self.file = file
        self.path = path
        self.problem = problem
    }
    public var description: String { "\(file.rawValue) \(problem)" }
}

/// What reading one state file gave.
public enum StateFileRead<Value: Sendable>: Sendable {
    /// There is no such file.
    case absent
    case damaged(StateFileDamage)
    case valid(Value)

    public var value: Value? {
        if case .valid(let value) = self { return value }
        return nil
    }

    public var damage: StateFileDamage? {
        if case .damaged(let damage) = self { return damage }
        return nil
    }
}

/// Decoding and encoding of every state file: pure (bytes in, a record or a problem out),
/// so that the fuzz harness (Sources/FerryFuzz) reaches it. A record is returned only if
/// it decodes and keeps its rules; anything else is a ``StateFileProblem``, never a crash.
public enum StateFileCoding {
    /// Ferry's records are a few hundred bytes; anything over this is not one of them.
    public static let maximumByteCount = 1 << 20

    /// Dates Ferry writes lie between these (a year 1 or 9999 is not a date it wrote).
    static let earliest = Date(timeIntervalSince1970: 946_684_800)  // 2000-01-01
    static let latest = Date(timeIntervalSince1970: 7_258_118_400)  // 2200-01-01

    public static func encode<T: Encodable>(_ value: T) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return try encoder.encode(value)
    }

    /// The spec of VM `vm` (nil: any name).
    public static func decodeSpec(_ data: Data, vm: String? = nil) throws(StateFileProblem) -> VMSpec {
        let spec = try decode(VMSpec.self, data)
        if let problem = check(spec, vm: vm) { throw StateFileProblem(problem) }
        return spec
    }

    public static func decodeState(_ data: Data) throws(StateFileProblem) -> VMState {
        let state = try decode(VMState.self, data)
        if let problem = check(state) { throw StateFileProblem(problem) }
        return state
    }

    public static func decodeHandover(_ data: Data) throws(StateFileProblem) -> HandoverRecord {
        let record = try decode(HandoverRecord.self, data)
        if let problem = check(record) { throw StateFileProblem(problem) }
        return record
    }

    public static func decodeIncoming(_ data: Data) throws(StateFileProblem) -> IncomingMigrations {
        let incoming = try decode(IncomingMigrations.self, data)
        if let problem = check(incoming) { throw StateFileProblem(problem) }
        return incoming
    }

    // MARK: The rules of each record

    /// What is wrong with `spec` as the spec of VM `vm`, or nil. The same bounds as the
    /// destination's check of an offer, and what `QEMU.arguments` needs to build a command
    /// line that says what the spec says (no comma inside an option value it does not escape).
    public static func check(_ spec: VMSpec, vm: String?) -> String? {
        if let problem = VMSpec.validateName(spec.name) { return "has a bad name: \(problem)" }
        if let vm, spec.name != vm { return "names VM '\(spec.name)', not '\(vm)'" }
        guard (16...(16 << 20)).contains(spec.memoryMiB) else { return "has memory of \(spec.memoryMiB) MiB, out of range" }
        guard (1...1024).contains(spec.cpus) else { return "has \(spec.cpus) vCPUs, out of range" }
        guard (0..<1024).contains(spec.ramPadKiB) else { return "has a RAM pad of \(spec.ramPadKiB) KiB, out of range" }
        for file in spec.bootFiles {
            guard isSHA256(file.sha256), file.byteCount >= 0 else { return "has a boot file with a malformed hash or size" }
        }
        guard isOptionWord(spec.machine) else { return "has a malformed machine type" }
        guard isOptionWord(spec.cpuModel) else { return "has a malformed CPU model" }
        guard !spec.append.contains("\0") else { return "has a NUL in its kernel command line" }
        for disk in spec.disks {
            guard disk.path.hasPrefix("/"), !disk.path.contains("\0"), disk.virtualSizeBytes > 0 else { return "has a malformed disk" }
        }
        for nic in spec.nics {
            guard NICSpec.normalizedMAC(nic.mac) == nic.mac else { return "has a NIC with a malformed MAC" }
            guard NICSpec.validBridgeName(nic.bridge), !nic.bridge.contains(",") else { return "has a NIC with a malformed bridge name" }
            guard isOptionWord(nic.model) else { return "has a NIC with a malformed model" }
        }
        if Set(spec.nics.map(\.mac)).count != spec.nics.count { return "gives one MAC to two NICs" }
        if let problem = spec.bootProblem { return problem }
        return nil
    }

    public static func check(_ state: VMState) -> String? {
        guard state.pid > 0 else { return "has pid \(state.pid)" }
        guard isDate(state.startedAt), state.updatedAt.map(isDate) ?? true else { return "has a date Ferry cannot have written" }
        if let session = state.session, !isToken(session) { return "has a malformed session" }
        if let update = state.update {
            guard state.phase == .updating else { return "has an update in progress outside the updating phase" }
            guard VMSpec.validateName(update.tag) == nil else { return "has a malformed update tag" }
            guard !update.binary.isEmpty, !update.binary.contains("\0") else { return "has a malformed update binary" }
        }
        if let binary = state.qemuBinary, binary.isEmpty || binary.contains("\0") { return "has a malformed QEMU binary" }
        return nil
    }

    public static func check(_ record: HandoverRecord) -> String? {
        guard isToken(record.session) else { return "has a malformed session" }
        switch (record.role, record.decision) {
        case (.source, .commit), (.destination, .prepared), (.destination, .committed): break
        default: return "says \(record.decision.rawValue) for a \(record.role.rawValue), which no host writes"
        }
        guard isToken(record.peerHost), record.peerPort > 0 else { return "has a malformed peer" }
        guard isDate(record.at) else { return "has a date Ferry cannot have written" }
        return nil
    }

    public static func check(_ incoming: IncomingMigrations) -> String? {
        guard incoming.pid > 0 else { return "has pid \(incoming.pid)" }
        guard incoming.limit >= 1 else { return "has a limit of \(incoming.limit)" }
        guard incoming.running.count <= incoming.limit else { return "has more migrations running than its limit" }
        guard isDate(incoming.updatedAt) else { return "has a date Ferry cannot have written" }
        for (entry, admitted) in incoming.running.map({ ($0, true) }) + incoming.queued.map({ ($0, false) }) {
            guard VMSpec.validateName(entry.vm) == nil, isToken(entry.session), !entry.source.contains("\0"),
                  isDate(entry.since), entry.admittedAt.map(isDate) ?? true else {
                return "has a malformed migration entry"
            }
            guard (entry.admittedAt != nil) == admitted else {
                return admitted ? "has a running migration that was never admitted" : "has a queued migration marked admitted"
            }
        }
        return nil
    }

    // MARK: Decoding

    static func decode<T: Decodable>(_ type: T.Type, _ data: Data) throws(StateFileProblem) -> T {
        guard !data.isEmpty else { throw StateFileProblem("is empty") }
        guard data.count <= maximumByteCount else { throw StateFileProblem("is \(data.count) bytes, too large to be a record") }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        do {
            return try decoder.decode(T.self, from: data)
        } catch let error as DecodingError {
            throw StateFileProblem(describe(error))
        } catch {
            throw StateFileProblem("cannot be decoded: \(error)")
        }
    }

    /// A decoding error in a few words, for `ferry vm list`.
    static func describe(_ error: DecodingError) -> String {
        func at(_ path: [CodingKey]) -> String {
            path.isEmpty ? "" : " at " + path.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
        }
        switch error {
        case .dataCorrupted(let context):
            return context.codingPath.isEmpty ? "is not JSON" : "has a malformed value\(at(context.codingPath))"
        case .keyNotFound(let key, let context):
            return "lacks \"\(key.stringValue)\"\(at(context.codingPath))"
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            return context.codingPath.isEmpty ? "is not a JSON object" : "has a value of the wrong type\(at(context.codingPath))"
        @unknown default:
            return "cannot be decoded"
        }
    }

    static func isSHA256(_ text: String) -> Bool {
        text.utf8.count == 64 && text.utf8.allSatisfy { (48...57).contains($0) || (97...102).contains($0) }
    }

    /// Non-empty printable ASCII without spaces and commas (a QEMU option value, a session, a host).
    static func isOptionWord(_ text: String) -> Bool {
        !text.isEmpty && text.utf8.count <= 256 && text.utf8.allSatisfy { $0 > 32 && $0 < 127 && $0 != UInt8(ascii: ",") }
    }

    static func isToken(_ text: String) -> Bool { isOptionWord(text) }

    static func isDate(_ date: Date) -> Bool { date >= earliest && date <= latest }
}

// MARK: - The queue of incoming migrations

/// What `ferry serve` writes to `<run>/incoming.json` whenever its incoming migrations
/// change, for `ferry status`.
public struct IncomingMigrations: Codable, Sendable, Equatable {
    public struct Entry: Codable, Sendable, Equatable {
        public var session: String
        public var vm: String
        public var source: String
        /// When it arrived.
        public var since: Date
        /// When it started transferring (nil: still waiting).
        public var admittedAt: Date?

        public init(session: String, vm: String, source: String, since: Date, admittedAt: Date? = nil) {
            self.session = session
            self.vm = vm
            self.source = source
            self.since = since
            self.admittedAt = admittedAt
        }
    }

    /// The daemon that wrote the file (a file from a dead daemon means nothing).
    public var pid: Int32
    public var limit: Int
    public var running: [Entry]
    public var queued: [Entry]
    public var updatedAt: Date

    public init(pid: Int32, limit: Int, running: [Entry], queued: [Entry], updatedAt: Date) {
        self.pid = pid
        self.limit = limit
        self.running = running
        self.queued = queued
        self.updatedAt = updatedAt
    }

    public static func path(runDirectory: String) -> String { runDirectory + "/incoming.json" }

    /// The file as `ferry status` reads it: absent, damaged (and why) or valid.
    public static func load(runDirectory: String) -> StateFileRead<IncomingMigrations> {
        StateFileCoding.load(.incoming, at: path(runDirectory: runDirectory), StateFileCoding.decodeIncoming)
    }

    public func write(runDirectory: String) {
        guard let data = try? StateFileCoding.encode(self) else { return }
        try? data.write(to: URL(fileURLWithPath: Self.path(runDirectory: runDirectory)), options: .atomic)
    }
}

extension StateFileCoding {
    /// Reads the file at `path` through `decode`.
    public static func load<T>(_ kind: StateFileKind, at path: String,
                               _ decode: (Data) throws(StateFileProblem) -> T) -> StateFileRead<T> {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT || errno == ENOTDIR { return .absent }
            return .damaged(StateFileDamage(file: kind, path: path, problem: "cannot be read: \(String(cString: strerror(errno)))"))
        }
        // At most one byte more than a record may have: enough to tell it is too large.
        var bytes = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 65536)
        while bytes.count <= maximumByteCount {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                let why = String(cString: strerror(errno))
                close(fd)
                return .damaged(StateFileDamage(file: kind, path: path, problem: "cannot be read: \(why)"))
            }
            if n == 0 { break }
            bytes += buffer[0..<n]
        }
        close(fd)
        do {
            return .valid(try decode(Data(bytes)))
        } catch {
            return .damaged(StateFileDamage(file: kind, path: path, problem: error.description))
        }
    }
}
