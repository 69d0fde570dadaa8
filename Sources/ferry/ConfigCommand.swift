import ArgumentParser
import FerryConfig
import FerryIO
import FerryInterfaces
import FerryMetrics
import Foundation
import Logging

/// The host configuration file, loaded once at process start (``Ferry/main()``), before
/// the arguments are parsed: its settings become the environment variables the options
/// fall back to, for the variables the environment does not set. See FerryConfig.
enum HostConfig {
    struct Loaded: Sendable {
        var reading: ConfigReading
        /// The environment before the file was applied (what `config show` calls "environment").
        var environment: [String: String]
    }

    private static let state = Locked<Loaded?>(nil)

    /// What main loaded (or, in tests that parse without main, the default file now).
    static var loaded: Loaded {
        if let loaded = state.current { return loaded }
        let environment = ProcessInfo.processInfo.environment
        let (path, explicit) = ConfigReading.locate(arguments: [], environment: environment)
        return Loaded(reading: ConfigReading.load(path: path, explicit: explicit, validators: validators), environment: environment)
    }

    /// Loads the file `arguments` or the environment names and sets the variables it sets,
    /// unless the environment sets them already. A file with a problem sets nothing; the
    /// commands that read host settings refuse to run (``HostOptions/validate()``).
    static func bootstrap(arguments: [String]) {
        var environment = ProcessInfo.processInfo.environment
        // What a parent Ferry process's file set is not the operator's environment.
        for variable in ConfigReading.inheritedFromFile(environment) + [ConfigReading.appliedVariable] {
            unsetenv(variable)
            environment[variable] = nil
        }
        let (path, explicit) = ConfigReading.locate(arguments: arguments, environment: environment)
        let reading = ConfigReading.load(path: path, explicit: explicit, validators: validators)
        let applied = reading.settingsToApply(environment: environment)
        for setting in applied {
            setenv(setting.key.variable, setting.value, 1)
        }
        if !applied.isEmpty { setenv(ConfigReading.appliedVariable, ConfigReading.appliedRecord(applied), 1) }
        state.withLock { $0 = Loaded(reading: reading, environment: environment) }
    }

    /// The file's problems as one message, nil when it has none.
    static var failure: String? {
        let reading = loaded.reading
        guard !reading.isValid else { return nil }
        return "the configuration file has errors (`ferry config check \(reading.path)` lists them):\n"
            + reading.problems.map { "  \($0)" }.joined(separator: "\n")
    }

    /// Each value's syntax, checked by the parser of the option the variable stands for.
    static let validators: Validators = [
        "nics": { NICSelection(argument: $0) == nil ? "'\($0)' is not a NIC list (eth0,eth1 or -eth2 to leave one out)" : nil },
        "nic-speeds": { SpeedList.parse($0) == nil ? "'\($0)' is not a list of NIC=RATE (eth1 = \"10gbit\")" : nil },
        "listen": { value in
            do {
                _ = try EnvironmentSettings.listen(value)
                return nil
            } catch {
                return "\(error)"
            }
        },
        "max-bandwidth": { Rate(argument: $0) == nil ? "'\($0)' is not a rate (e.g. 2gbit, 500mbit, 100MB)" : nil },
        "max-guest-memory": { MemorySize(argument: $0) == nil ? "'\($0)' is not a size (e.g. 64G, 512M)" : nil },
        "metrics": { MetricsAddress(parsing: $0) == nil ? "'\($0)' is not PORT or HOST:PORT" : nil },
        "log-level": { Logger.Level(rawValue: $0) == nil ? "'\($0)' is not a log level (\(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")))" : nil },
    ]
}

/// The settings `ferry serve` and the logging read from their variables, parsed with the
/// options' own parsers; a bad value names its variable.
enum EnvironmentSettings {
    struct Invalid: Error, CustomStringConvertible {
        var description: String
    }

    static func value(_ variable: String) -> String? {
        ProcessInfo.processInfo.environment[variable].flatMap { $0.isEmpty ? nil : $0 }
    }

    /// ADDRESS[:PORT],... all on one port.
    static func listen(_ text: String) throws -> [Endpoint] {
        var endpoints: [Endpoint] = []
        for item in text.split(separator: ",") {
            let trimmed = item.trimmingCharacters(in: .whitespaces)
            guard let endpoint = Endpoint(argument: trimmed) else { throw Invalid(description: "'\(trimmed)' is not ADDRESS[:PORT]") }
            endpoints.append(endpoint)
        }
        guard !endpoints.isEmpty else { throw Invalid(description: "no address") }
        guard Set(endpoints.map(\.port)).count == 1 else {
            throw Invalid(description: "every address must use the same port (data channels are told one port)")
        }
        return endpoints
    }

    static func checked<T>(_ variable: String, _ parse: (String) -> T?) throws -> T? {
        guard let text = value(variable) else { return nil }
        guard let parsed = parse(text) else { throw ValidationError("\(variable)=\(text) is not valid") }
        return parsed
    }
}

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config",
        abstract: "Show or check the host configuration file (\(ConfigKey.defaultFile)).",
        discussion: """
            The file (TOML) holds what an operator sets once per host; each key stands for an
            environment variable. Precedence: a command's flag, then the environment, then the file.
            --config FILE or $FERRY_CONFIG names another file. See packaging/ferry.conf.example.
            """,
        subcommands: [Show.self, Check.self])

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print every setting in force, its value and where it comes from: the environment, the file (FILE:LINE) or the default.")

        @Option(name: .customLong("config"), help: "The configuration file (default: $FERRY_CONFIG or \(ConfigKey.defaultFile)).")
        var configFile: String?

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let loaded = HostConfig.loaded
            let reading = loaded.reading
            let rows = reading.sources(environment: loaded.environment)
            if json {
                var settings: [[String: Any]] = []
                for row in rows {
                    var item: [String: Any] = ["key": row.key.name, "variable": row.key.variable, "value": row.value]
                    switch row.source {
                    case .environment: item["source"] = "environment"
                    case .file(let path, let line):
                        item["source"] = "file"
                        item["file"] = path
                        item["line"] = line
                    case .default: item["source"] = "default"
                    }
                    settings.append(item)
                }
                let object: [String: Any] = ["file": reading.path, "fileExists": reading.exists,
                                             "problems": reading.problems.map(\.description), "settings": settings]
                let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
                print(String(decoding: data, as: UTF8.self))
            } else {
                print("file: \(reading.path)" + (reading.exists ? "" : " (not there: no settings from a file)"))
                for row in rows {
                    let source = switch row.source {
                    case .environment(let variable): "environment \(variable)"
                    case .file(let path, let line): "\(path):\(line)"
                    case .default: "default"
                    }
                    print("\(row.key.name.padding(25))\(row.value.padding(32)) \(source)")
                }
            }
            if !reading.isValid {
                FileHandle.standardError.write(Data((HostConfig.failure! + "\n").utf8))
                throw ExitCode(1)
            }
        }
    }

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Check a configuration file: prints ok, or every error with its line (exit status 1). Changes nothing.")

        @Argument(help: "The file to check (default: --config, $FERRY_CONFIG or \(ConfigKey.defaultFile)).")
        var file: String?

        @Option(name: .customLong("config"), help: "The configuration file (default: $FERRY_CONFIG or \(ConfigKey.defaultFile)).")
        var configFile: String?

        func run() throws {
            let (path, explicit): (String, Bool) = if let named = file ?? configFile { (named, true) }
                else { ConfigReading.locate(arguments: [], environment: ProcessInfo.processInfo.environment) }
            let reading = ConfigReading.load(path: path, explicit: explicit, validators: HostConfig.validators)
            guard reading.isValid else {
                for problem in reading.problems { print(problem) }
                throw ExitCode(1)
            }
            if reading.exists {
                print("ok: \(path), \(reading.settings.count) setting\(reading.settings.count == 1 ? "" : "s")")
            } else {
                print("ok: \(path) is not there (no settings from a file)")
            }
        }
    }
}
