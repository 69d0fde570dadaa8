import Foundation

/// The host configuration file, `/etc/ferry/ferry.conf`: what an operator sets once per
/// host. Each key stands for an environment variable that Ferry reads anyway; loading the
/// file sets the variables the environment does not set already, before the command line
/// is parsed. Every option reads its flag first and its variable next, so the precedence
/// (flag, then environment, then file) follows without any option knowing about the file.
///
/// This module holds the grammar (``TOMLDocument``), the schema (``ConfigKey/all``) and
/// the rules (which file, which setting wins); the checks of each value's syntax belong to
/// the types the options parse (`Rate`, `Endpoint`...) and come in as ``Validators``.
public struct ConfigKey: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// A string that must be an absolute path.
        case path
        /// A string.
        case text
        /// A string or an integer (a port alone).
        case textOrInteger
        /// An array of strings or one string: joined with commas.
        case list
        /// A `[key]` table of strings or one string "name=value,...": as name=value,...
        case table
        /// An integer in a range.
        case integer(ClosedRange<Int>)
    }

    public let name: String
    public let variable: String
    public let kind: Kind
    /// The value in force when neither the environment nor the file sets it, for people.
    public let defaultValue: String

    public static let all: [ConfigKey] = [
        ConfigKey(name: "state-dir", variable: "FERRY_STATE_DIR", kind: .path, defaultValue: "/var/lib/ferry"),
        ConfigKey(name: "memory-dir", variable: "FERRY_MEMORY_DIR", kind: .path, defaultValue: "/dev/shm"),
        ConfigKey(name: "key-file", variable: "FERRY_KEY_FILE", kind: .path, defaultValue: "/etc/ferry/cluster.key"),
        ConfigKey(name: "nics", variable: "FERRY_NICS", kind: .list, defaultValue: "all"),
        ConfigKey(name: "nic-speeds", variable: "FERRY_NIC_SPEEDS", kind: .table, defaultValue: "the kernel's"),
        ConfigKey(name: "listen", variable: "FERRY_LISTEN", kind: .list, defaultValue: "every address of the migration NICs, port 7470"),
        ConfigKey(name: "max-migrations", variable: "FERRY_MAX_MIGRATIONS", kind: .integer(1...64), defaultValue: "2"),
        ConfigKey(name: "max-outgoing-migrations", variable: "FERRY_MAX_OUTGOING_MIGRATIONS", kind: .integer(1...64), defaultValue: "2"),
        ConfigKey(name: "max-bandwidth", variable: "FERRY_MAX_BANDWIDTH", kind: .text, defaultValue: "no limit"),
        ConfigKey(name: "max-guest-memory", variable: "FERRY_MAX_GUEST_MEMORY", kind: .text, defaultValue: "the host's memory"),
        ConfigKey(name: "disk-dir", variable: "FERRY_DISK_DIR", kind: .path, defaultValue: "<state-dir>/disks"),
        ConfigKey(name: "metrics", variable: "FERRY_METRICS", kind: .textOrInteger, defaultValue: "off"),
        ConfigKey(name: "log-level", variable: "FERRY_LOG_LEVEL", kind: .text, defaultValue: "warning (serve: info)"),
    ]

    public static func named(_ name: String) -> ConfigKey? { all.first { $0.name == name } }

    /// The variable that names another file, and the file read when it does not.
    public static let fileVariable = "FERRY_CONFIG"
    public static let defaultFile = "/etc/ferry/ferry.conf"
}

/// Checks of a value's syntax, by key name, on the value as its variable holds it: nil
/// when it is good, else what is wrong. The CLI gives the parsers its flags use.
public typealias Validators = [String: @Sendable (String) -> String?]

/// One mistake in a file: where it is, which key, what is wrong.
public struct ConfigProblem: Error, Sendable, Equatable, CustomStringConvertible {
    public var file: String
    public var position: TOMLPosition?
    public var key: String?
    public var message: String

    public var description: String {
        var text = file
        if let position { text += ":\(position.line):\(position.column)" }
        text += ": "
        if let key { text += "\(key): " }
        return text + message
    }
}

/// One setting the file makes: the variable's value and the line it came from.
public struct ConfigSetting: Sendable, Equatable {
    public var key: ConfigKey
    public var value: String
    public var line: Int
}

/// A file read and checked: its settings, or the problems that make it unusable.
public struct ConfigReading: Sendable, Equatable {
    public var path: String
    /// False for a default file that is not there (no settings, not an error).
    public var exists: Bool
    public var settings: [ConfigSetting]
    public var problems: [ConfigProblem]

    public var isValid: Bool { problems.isEmpty }

    /// Which file: `--config FILE` among the arguments (before a `--`), else
    /// `FERRY_CONFIG`, else the default. `explicit` when named (then it must exist).
    public static func locate(arguments: [String], environment: [String: String]) -> (path: String, explicit: Bool) {
        var i = 0
        while i < arguments.count {
            let a = arguments[i]
            if a == "--" { break }
            if a == "--config", i + 1 < arguments.count { return (arguments[i + 1], true) }
            if a.hasPrefix("--config=") { return (String(a.dropFirst("--config=".count)), true) }
            i += 1
        }
        if let named = environment[ConfigKey.fileVariable], !named.isEmpty { return (named, true) }
        return (ConfigKey.defaultFile, false)
    }

    /// Reads and checks the file at `path`.
    public static func load(path: String, explicit: Bool, validators: Validators = [:]) -> ConfigReading {
        guard FileManager.default.fileExists(atPath: path) else {
            if explicit {
                return ConfigReading(path: path, exists: false, settings: [],
                                     problems: [ConfigProblem(file: path, message: "no such file")])
            }
            return ConfigReading(path: path, exists: false, settings: [], problems: [])
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            return ConfigReading(path: path, exists: true, settings: [], problems: [ConfigProblem(file: path, message: "cannot read it (\(String(cString: strerror(errno))))")])
        }
        guard let text = String(data: data, encoding: .utf8) else {
            return ConfigReading(path: path, exists: true, settings: [], problems: [ConfigProblem(file: path, message: "not UTF-8 text")])
        }
        return parse(text, path: path, validators: validators)
    }

    /// Checks `text` against the schema: every problem, not only the first (a syntax
    /// error is the exception: what follows it cannot be read).
    public static func parse(_ text: String, path: String, validators: Validators = [:]) -> ConfigReading {
        let document: TOMLDocument
        do {
            document = try TOMLDocument.parse(text)
        } catch {
            return ConfigReading(path: path, exists: true, settings: [], problems: [ConfigProblem(file: path, position: error.position, message: error.message)])
        }
        var settings: [ConfigSetting] = []
        var problems: [ConfigProblem] = []
        func problem(_ at: TOMLPosition, _ key: String?, _ message: String) {
            problems.append(ConfigProblem(file: path, position: at, key: key, message: message))
        }
        for table in document.tables {
            guard let key = ConfigKey.named(table.name) else {
                problem(table.position, table.name, "unknown table" + suggestion(table.name))
                continue
            }
            guard key.kind == .table else {
                problem(table.position, table.name, "is not a table; write \(table.name) = ...")
                continue
            }
            let entries = document.entries(in: table.name)
            var pairs: [String] = []
            var ok = true
            for entry in entries {
                guard case .string(let s) = entry.value.kind else {
                    problem(entry.value.position, "\(table.name).\(entry.key)", "expected a string, found \(entry.value.typeName)")
                    ok = false
                    continue
                }
                guard !entry.key.contains("="), !entry.key.contains(","), !s.contains(","), !s.contains("=") else {
                    problem(entry.keyPosition, "\(table.name).\(entry.key)", "names and values cannot hold ',' or '='")
                    ok = false
                    continue
                }
                pairs.append("\(entry.key)=\(s)")
            }
            guard ok else { continue }
            guard !pairs.isEmpty else {
                problem(table.position, table.name, "the table is empty")
                continue
            }
            let value = pairs.joined(separator: ",")
            if let wrong = validators[key.name]?(value) {
                problem(table.position, key.name, wrong)
                continue
            }
            settings.append(ConfigSetting(key: key, value: value, line: table.position.line))
        }
        for entry in document.entries(in: nil) {
            guard let key = ConfigKey.named(entry.key) else {
                problem(entry.keyPosition, entry.key, "unknown key" + suggestion(entry.key))
                continue
            }
            switch convert(entry.value, to: key) {
            case .failure(let wrong):
                problem(wrong.position, key.name, wrong.message)
            case .success(let value):
                if let wrong = validators[key.name]?(value) {
                    problem(entry.value.position, key.name, wrong)
                } else {
                    settings.append(ConfigSetting(key: key, value: value, line: entry.keyPosition.line))
                }
            }
        }
        settings.sort { $0.line < $1.line }
        problems.sort { ($0.position ?? TOMLPosition(line: 0, column: 0)) < ($1.position ?? TOMLPosition(line: 0, column: 0)) }
        return ConfigReading(path: path, exists: true, settings: problems.isEmpty ? settings : [], problems: problems)
    }

    /// The value as the key's variable holds it.
    static func convert(_ value: TOMLValue, to key: ConfigKey) -> Result<String, TOMLError> {
        func wrong(_ expected: String) -> Result<String, TOMLError> {
            .failure(TOMLError(position: value.position, message: "expected \(expected), found \(value.typeName)"))
        }
        switch (key.kind, value.kind) {
        case (.path, .string(let s)):
            guard s.hasPrefix("/") else { return .failure(TOMLError(position: value.position, message: "'\(s)' is not an absolute path")) }
            return .success(s)
        case (.path, _): return wrong("an absolute path in a string")
        case (.text, .string(let s)), (.textOrInteger, .string(let s)):
            guard !s.isEmpty else { return .failure(TOMLError(position: value.position, message: "empty")) }
            return .success(s)
        case (.textOrInteger, .integer(let n)): return .success(String(n))
        case (.text, _): return wrong("a string")
        case (.textOrInteger, _): return wrong("a string or an integer")
        case (.list, .string(let s)):
            guard !s.isEmpty else { return .failure(TOMLError(position: value.position, message: "empty")) }
            return .success(s)
        case (.list, .array(let items)):
            var strings: [String] = []
            for item in items {
                guard case .string(let s) = item.kind else {
                    return .failure(TOMLError(position: item.position, message: "expected strings in the array, found \(item.typeName)"))
                }
                guard !s.isEmpty, !s.contains(",") else {
                    return .failure(TOMLError(position: item.position, message: s.isEmpty ? "empty string in the array" : "'\(s)': one item per string, no commas"))
                }
                strings.append(s)
            }
            guard !strings.isEmpty else { return .failure(TOMLError(position: value.position, message: "the array is empty (leave the key out for the default)")) }
            return .success(strings.joined(separator: ","))
        case (.list, _): return wrong("an array of strings")
        case (.table, .string(let s)):
            guard !s.isEmpty else { return .failure(TOMLError(position: value.position, message: "empty")) }
            return .success(s)
        case (.table, _): return wrong("a [\(key.name)] table or a string \"name=value,...\"")
        case (.integer(let range), .integer(let n)):
            guard range.contains(n) else {
                return .failure(TOMLError(position: value.position, message: "\(n) is out of range (\(range.lowerBound) to \(range.upperBound))"))
            }
            return .success(String(n))
        case (.integer, _): return wrong("an integer")
        }
    }

    /// " (did you mean 'x'?)" when a key is a small edit away from `name`.
    static func suggestion(_ name: String) -> String {
        let scored = ConfigKey.all.map { ($0.name, editDistance(name.lowercased(), $0.name)) }.min { $0.1 < $1.1 }
        guard let (best, distance) = scored, distance <= max(2, name.count / 4) else { return "" }
        return " (did you mean '\(best)'?)"
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var previous = Array(0...b.count)
        for i in 1...a.count {
            var row = [i] + Array(repeating: 0, count: b.count)
            for j in 1...b.count {
                row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            previous = row
        }
        return previous[b.count]
    }

    /// The settings that apply: those whose variable the environment does not set.
    public func settingsToApply(environment: [String: String]) -> [ConfigSetting] {
        guard isValid else { return [] }
        return settings.filter { environment[$0.key.variable] == nil }
    }

    /// The variable in which a Ferry process tells the Ferry processes it starts (`lab exec`,
    /// `demo`, `bench`...) which variables its file set, as VAR=value lines: those are not
    /// the operator's environment, and a child with a file of its own (`--config`) must read
    /// its own, not inherit its parent's as if they were set by hand.
    public static let appliedVariable = "FERRY_CONFIG_APPLIED"

    /// The record of `settings` for ``appliedVariable``.
    public static func appliedRecord(_ settings: [ConfigSetting]) -> String {
        settings.map { "\($0.key.variable)=\($0.value)" }.joined(separator: "\n")
    }

    /// The variables of `environment` that a parent's file set and that still hold the
    /// value it gave them (one set again since, by hand or by the parent, is the operator's).
    public static func inheritedFromFile(_ environment: [String: String]) -> [String] {
        guard let record = environment[appliedVariable] else { return [] }
        return record.split(separator: "\n").compactMap { line in
            let parts = line.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2 else { return nil }
            let variable = String(parts[0])
            guard ConfigKey.all.contains(where: { $0.variable == variable }), environment[variable] == String(parts[1]) else { return nil }
            return variable
        }
    }

    /// Where a value in force comes from.
    public enum Source: Sendable, Equatable {
        case environment(variable: String)
        case file(path: String, line: Int)
        case `default`
    }

    /// Every key with its value in force and its source, given the environment as it was
    /// before the file was applied.
    public func sources(environment: [String: String]) -> [(key: ConfigKey, value: String, source: Source)] {
        ConfigKey.all.map { key in
            if let value = environment[key.variable] { return (key, value, .environment(variable: key.variable)) }
            if isValid, let setting = settings.first(where: { $0.key == key }) { return (key, setting.value, .file(path: path, line: setting.line)) }
            return (key, key.defaultValue, .default)
        }
    }
}
