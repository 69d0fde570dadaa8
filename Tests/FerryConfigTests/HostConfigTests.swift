@testable import FerryConfig
import Foundation
import Testing

@Suite("Host configuration: schema, values as their variables hold them, precedence")
struct HostConfigTests {
    static let sample = """
        # ferry.conf
        state-dir = "/srv/ferry"
        memory-dir = "/dev/hugepages"
        key-file = '/etc/ferry/cluster.key'
        nics = ["eth1", "eth2"]
        listen = ["10.0.0.1:7000", "10.0.1.1:7000"]
        max-migrations = 4
        max-outgoing-migrations = 3
        max-bandwidth = "5gbit"
        max-guest-memory = "64G"
        disk-dir = "/srv/disks"
        metrics = 9470
        log-level = "notice"

        [nic-speeds]
        eth1 = "10gbit"
        eth2 = "25gbit"
        """

    @Test("every key becomes its variable's value")
    func everyKey() {
        let reading = ConfigReading.parse(Self.sample, path: "/f")
        #expect(reading.problems.isEmpty, "\(reading.problems)")
        let values = Dictionary(uniqueKeysWithValues: reading.settings.map { ($0.key.variable, $0.value) })
        #expect(values == [
            "FERRY_STATE_DIR": "/srv/ferry", "FERRY_MEMORY_DIR": "/dev/hugepages", "FERRY_KEY_FILE": "/etc/ferry/cluster.key",
            "FERRY_NICS": "eth1,eth2", "FERRY_LISTEN": "10.0.0.1:7000,10.0.1.1:7000", "FERRY_MAX_MIGRATIONS": "4",
            "FERRY_MAX_OUTGOING_MIGRATIONS": "3", "FERRY_MAX_BANDWIDTH": "5gbit", "FERRY_MAX_GUEST_MEMORY": "64G", "FERRY_DISK_DIR": "/srv/disks",
            "FERRY_METRICS": "9470", "FERRY_LOG_LEVEL": "notice", "FERRY_NIC_SPEEDS": "eth1=10gbit,eth2=25gbit",
        ])
        #expect(reading.settings.first { $0.key.name == "nic-speeds" }?.line == 15)
        #expect(reading.settings.first { $0.key.name == "nics" }?.line == 5)
        #expect(Set(reading.settings.map(\.key.name)) == Set(ConfigKey.all.map(\.name)), "the sample names every key")
    }

    @Test("strings stand for lists and tables too, as the variables write them")
    func stringForms() {
        let reading = ConfigReading.parse("nics = \"-eth0\"\nnic-speeds = \"eth1=10gbit\"\nmetrics = \"0.0.0.0:9470\"\n", path: "/f")
        #expect(reading.problems.isEmpty)
        #expect(reading.settings.map(\.value) == ["-eth0", "eth1=10gbit", "0.0.0.0:9470"])
    }

    @Test("each mistake is an error naming file, line, column and key", arguments: [
        ("max-migration = 4", "/f:1:1: max-migration: unknown key (did you mean 'max-migrations'?)"),
        ("listn = [\"a\"]", "/f:1:1: listn: unknown key (did you mean 'listen'?)"),
        ("colour = \"blue\"", "/f:1:1: colour: unknown key"),
        ("[nic-speed]\neth1 = \"1gbit\"", "/f:1:1: nic-speed: unknown table (did you mean 'nic-speeds'?)"),
        ("[listen]\na = \"b\"", "/f:1:1: listen: is not a table; write listen = ..."),
        ("\nmax-migrations = 65", "/f:2:18: max-migrations: 65 is out of range (1 to 64)"),
        ("max-migrations = 0", "/f:1:18: max-migrations: 0 is out of range (1 to 64)"),
        ("max-migrations = \"4\"", "/f:1:18: max-migrations: expected an integer, found a string"),
        ("state-dir = \"var/lib\"", "/f:1:13: state-dir: 'var/lib' is not an absolute path"),
        ("key-file = 1", "/f:1:12: key-file: expected an absolute path in a string, found an integer"),
        ("nics = [\"eth1\", 2]", "/f:1:17: nics: expected strings in the array, found an integer"),
        ("nics = []", "/f:1:8: nics: the array is empty (leave the key out for the default)"),
        ("nics = [\"a,b\"]", "/f:1:9: nics: 'a,b': one item per string, no commas"),
        ("log-level = true", "/f:1:13: log-level: expected a string, found a boolean"),
        ("[nic-speeds]\neth1 = 10", "/f:2:8: nic-speeds.eth1: expected a string, found an integer"),
        ("[nic-speeds]\n", "/f:1:1: nic-speeds: the table is empty"),
        ("nic-speeds = 3", "/f:1:14: nic-speeds: expected a [nic-speeds] table or a string \"name=value,...\", found an integer"),
        ("a = \"x", "/f:1:5: the string is not closed on its line"),
    ])
    func problems(text: String, message: String) {
        let reading = ConfigReading.parse(text, path: "/f")
        #expect(reading.problems.map(\.description) == [message])
        #expect(reading.settings.isEmpty, "a file with an error sets nothing")
    }

    @Test("every problem, not only the first; a bad file applies nothing")
    func allProblems() {
        let reading = ConfigReading.parse("max-migrations = 100\nnics = \"eth1\"\nbogus = 1\n", path: "/f")
        #expect(reading.problems.map(\.position?.line) == [1, 3])
        #expect(reading.settingsToApply(environment: [:]).isEmpty)
    }

    @Test("validators: a bad value is named with what the flag's parser says")
    func validators() {
        let validators: Validators = ["max-bandwidth": { $0.hasSuffix("bit") ? nil : "'\($0)' is not a rate" }]
        let reading = ConfigReading.parse("max-bandwidth = \"fast\"", path: "/f", validators: validators)
        #expect(reading.problems.map(\.description) == ["/f:1:17: max-bandwidth: 'fast' is not a rate"])
        let table = ConfigReading.parse("[nic-speeds]\neth1 = \"x\"", path: "/f", validators: ["nic-speeds": { _ in "bad" }])
        #expect(table.problems.map(\.description) == ["/f:1:1: nic-speeds: bad"])
    }

    @Test("precedence: the environment wins over the file, the file over the default")
    func precedence() {
        let reading = ConfigReading.parse("state-dir = \"/srv/ferry\"\nmax-migrations = 4\n", path: "/etc/ferry/ferry.conf")
        let environment = ["FERRY_MAX_MIGRATIONS": "8"]
        #expect(reading.settingsToApply(environment: environment).map(\.key.variable) == ["FERRY_STATE_DIR"])
        let sources = Dictionary(uniqueKeysWithValues: reading.sources(environment: environment).map { ($0.key.name, ($0.value, $0.source)) })
        #expect(sources["max-migrations"]! == ("8", .environment(variable: "FERRY_MAX_MIGRATIONS")))
        #expect(sources["state-dir"]! == ("/srv/ferry", .file(path: "/etc/ferry/ferry.conf", line: 1)))
        #expect(sources["memory-dir"]! == ("/dev/shm", .default))
        #expect(sources.count == ConfigKey.all.count)
    }

    @Test("a parent Ferry process's file is not its children's environment, unless the value changed since")
    func inherited() {
        let reading = ConfigReading.parse("max-migrations = 4\nnics = [\"eth1\"]\n", path: "/f")
        let record = ConfigReading.appliedRecord(reading.settings)
        #expect(record == "FERRY_MAX_MIGRATIONS=4\nFERRY_NICS=eth1")
        let child = ["FERRY_CONFIG_APPLIED": record, "FERRY_MAX_MIGRATIONS": "4", "FERRY_NICS": "-ferrybr0", "FERRY_STATE_DIR": "/x"]
        #expect(ConfigReading.inheritedFromFile(child) == ["FERRY_MAX_MIGRATIONS"])
        #expect(ConfigReading.inheritedFromFile(["FERRY_CONFIG_APPLIED": "PATH=/bin\ngarbage", "PATH": "/bin"]).isEmpty)
        #expect(ConfigReading.inheritedFromFile(["FERRY_MAX_MIGRATIONS": "4"]).isEmpty)
    }

    @Test("which file: --config, else FERRY_CONFIG, else the default (which may be missing)")
    func locate() {
        #expect(ConfigReading.locate(arguments: ["serve", "--config", "/a"], environment: ["FERRY_CONFIG": "/b"]) == ("/a", true))
        #expect(ConfigReading.locate(arguments: ["serve", "--config=/a"], environment: [:]) == ("/a", true))
        #expect(ConfigReading.locate(arguments: ["serve", "--", "--config", "/a"], environment: ["FERRY_CONFIG": "/b"]) == ("/b", true))
        #expect(ConfigReading.locate(arguments: ["serve"], environment: [:]) == ("/etc/ferry/ferry.conf", false))
    }

    @Test("a missing default file is no settings; a missing named file is an error")
    func missing() {
        let path = NSTemporaryDirectory() + "ferry-missing-\(UUID().uuidString).conf"
        let quiet = ConfigReading.load(path: path, explicit: false)
        #expect(quiet.isValid && !quiet.exists && quiet.settings.isEmpty)
        let named = ConfigReading.load(path: path, explicit: true)
        #expect(named.problems.map(\.description) == ["\(path): no such file"])
    }

    @Test("the file on disk: read and parsed")
    func load() throws {
        let path = NSTemporaryDirectory() + "ferry-\(UUID().uuidString).conf"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Self.sample.write(toFile: path, atomically: true, encoding: .utf8)
        let reading = ConfigReading.load(path: path, explicit: true)
        #expect(reading.isValid && reading.exists && reading.settings.count == ConfigKey.all.count)
    }

    @Test("the example in packaging/ lists every key and parses (its settings all commented out)")
    func example() throws {
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = try String(contentsOf: repo.appendingPathComponent("packaging/ferry.conf.example"), encoding: .utf8)
        let reading = ConfigReading.parse(text, path: "example")
        #expect(reading.problems.isEmpty, "\(reading.problems)")
        #expect(reading.settings.isEmpty)
        for key in ConfigKey.all {
            #expect(text.contains("# \(key.name) = ") || text.contains("# [\(key.name)]"), "the example names \(key.name)")
        }
        // Uncommented, every example value is valid.
        let uncommented = text.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
            let l = String(line)
            guard l.hasPrefix("# "), let next = l.dropFirst(2).first, next.isLetter || next == "[" else { return l }
            if l.dropFirst(2).contains(" = ") || l.hasPrefix("# [") { return String(l.dropFirst(2)) }
            return l
        }.joined(separator: "\n")
        let full = ConfigReading.parse(uncommented, path: "example")
        #expect(full.problems.isEmpty, "\(full.problems)")
        #expect(full.settings.count == ConfigKey.all.count)
    }

    @Test("did you mean: small edits only")
    func suggestions() {
        #expect(ConfigReading.suggestion("statedir") == " (did you mean 'state-dir'?)")
        #expect(ConfigReading.suggestion("MAX-BANDWIDTH") == " (did you mean 'max-bandwidth'?)")
        #expect(ConfigReading.suggestion("weather") == "")
        #expect(ConfigReading.editDistance("", "abc") == 3)
        #expect(ConfigReading.editDistance("kitten", "sitting") == 3)
    }
}
