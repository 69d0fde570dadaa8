@testable import FerryConfig
import Testing

@Suite("TOML: the subset the host configuration reads")
struct TOMLTests {
    private func values(_ text: String) throws -> [String: TOMLValue.Kind] {
        let doc = try TOMLDocument.parse(text)
        return Dictionary(uniqueKeysWithValues: doc.entries.map { (($0.table.map { $0 + "." } ?? "") + $0.key, $0.value.kind) })
    }

    @Test("comments, bare and quoted keys, strings, integers, booleans")
    func scalars() throws {
        let v = try values("""
            # a comment
            bare-key_1 = "basic"   # after a value
            "quoted key" = 'lit\\eral'
            'single' = "esc \\" \\\\ \\t \\n \\u00e9 \\U0001F600"
            n = 1_000
            neg = -42
            plus = +7
            zero = 0
            yes = true
            no = false
            hash = "a # is not a comment here"
            """)
        #expect(v["bare-key_1"] == .string("basic"))
        #expect(v["quoted key"] == .string("lit\\eral"))
        #expect(v["single"] == .string("esc \" \\ \t \n é 😀"))
        #expect(v["n"] == .integer(1000))
        #expect(v["neg"] == .integer(-42))
        #expect(v["plus"] == .integer(7))
        #expect(v["zero"] == .integer(0))
        #expect(v["yes"] == .boolean(true))
        #expect(v["no"] == .boolean(false))
        #expect(v["hash"] == .string("a # is not a comment here"))
    }

    @Test("arrays on one line and on several, with comments and a trailing comma")
    func arrays() throws {
        let v = try values("""
            a = ["eth1", "eth2"]
            b = [
              "x",   # first
              # between
              'y',
            ]
            c = []
            d = [1, 2_0]
            """)
        func strings(_ kind: TOMLValue.Kind?) -> [String] {
            guard case .array(let items) = kind else { return [] }
            return items.compactMap { if case .string(let s) = $0.kind { s } else { nil } }
        }
        #expect(strings(v["a"]) == ["eth1", "eth2"])
        #expect(strings(v["b"]) == ["x", "y"])
        guard case .array(let empty) = v["c"] else { Issue.record("c"); return }
        #expect(empty.isEmpty)
        guard case .array(let ints) = v["d"] else { Issue.record("d"); return }
        #expect(ints.map(\.kind) == [.integer(1), .integer(20)])
    }

    @Test("tables: keys after a header belong to it; CRLF line ends")
    func tables() throws {
        let doc = try TOMLDocument.parse("top = 1\r\n[nic-speeds]\r\neth1 = \"10gbit\"\r\n\"eth.2\" = \"1gbit\"\r\n")
        #expect(doc.entries(in: nil).map(\.key) == ["top"])
        #expect(doc.entries(in: "nic-speeds").map(\.key) == ["eth1", "eth.2"])
        #expect(doc.tables.map(\.name) == ["nic-speeds"])
        #expect(doc.tables.first?.position == TOMLPosition(line: 2, column: 1))
    }

    @Test("positions of keys and values")
    func positions() throws {
        let doc = try TOMLDocument.parse("\n  key = [\n  \"v\" ]\n")
        let entry = try #require(doc.entries.first)
        #expect(entry.keyPosition == TOMLPosition(line: 2, column: 3))
        #expect(entry.value.position == TOMLPosition(line: 2, column: 9))
        guard case .array(let items) = entry.value.kind else { Issue.record("not an array"); return }
        #expect(items.first?.position == TOMLPosition(line: 3, column: 3))
    }

    @Test("each syntax error names its line and column", arguments: [
        ("key = \"open", 1, 7, "not closed"),
        ("key = 'open\n", 1, 7, "not closed"),
        ("key = \"\\q\"", 1, 8, "unknown escape"),
        ("key = \"\\u12\"", 1, 8, "hexadecimal"),
        ("a = 1\nb = 1.5", 2, 5, "float"),
        ("a = 2024-01-01", 1, 5, "float or a date"),
        ("a = 01", 1, 5, "not a valid integer"),
        ("a = 1__0", 1, 5, "not a valid integer"),
        ("a = _1", 1, 5, "not a value"),
        ("a = eth1", 1, 5, "strings need quotes"),
        ("a = 99999999999999999999", 1, 5, "not a valid integer"),
        ("a = \"x\" b", 1, 9, "end of the line"),
        ("a 1", 1, 3, "expected '='"),
        ("= 1", 1, 1, "expected a key"),
        ("a.b = 1", 1, 2, "dotted keys"),
        ("a = { b = 1 }", 1, 5, "inline tables"),
        ("a = \"\"\"x\"\"\"", 1, 5, "multi-line"),
        ("a = [1, 2", 1, 5, "not closed"),
        ("a = [\n  \"x\",\n", 1, 5, "not closed"),
        ("a = [1 2]", 1, 8, "expected ',' or ']'"),
        ("a = ", 1, 5, "expected a value"),
        ("a = 1\na = 2", 2, 1, "defined twice"),
        ("[t]\n[t]", 2, 1, "defined twice"),
        ("t = 1\n[t]", 2, 1, "defined twice"),
        ("[[t]]", 1, 1, "arrays of tables"),
        ("[a.b]", 1, 3, "nested tables"),
        ("[t", 1, 3, "expected ']'"),
        ("a = \"x\u{01}\"", 1, 7, "control character"),
        ("a = inf", 1, 5, "not a value"),
    ])
    func errors(text: String, line: Int, column: Int, message: String) {
        do {
            _ = try TOMLDocument.parse(text)
            Issue.record("\(text) parsed")
        } catch {
            #expect(error.position == TOMLPosition(line: line, column: column), "\(error)")
            #expect(error.message.contains(message), "\(error)")
        }
    }

    @Test("an empty file and a file of comments are empty documents")
    func empty() throws {
        #expect(try TOMLDocument.parse("").entries.isEmpty)
        #expect(try TOMLDocument.parse("# only\n\n   # comments\n").entries.isEmpty)
    }
}
