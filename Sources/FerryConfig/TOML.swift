/// The subset of TOML (v1.0) that Ferry's host configuration needs, and nothing more:
/// comments, bare and quoted keys, basic strings (with escapes) and literal strings,
/// decimal integers (with `_` between digits), booleans, arrays of those on one or several
/// lines, and `[table]` headers one level deep. Floats, dates, multi-line strings, inline
/// tables and dotted keys are refused with an error that says so, never misread.
///
/// A value, not I/O: the caller reads the file. Every error names its line and column
/// (both from 1, columns in characters).
public struct TOMLPosition: Sendable, Equatable, Comparable, CustomStringConvertible {
    public var line: Int
    public var column: Int
    public init(line: Int, column: Int) {
        self.line = line
        self.column = column
    }
    public static func < (a: Self, b: Self) -> Bool { (a.line, a.column) < (b.line, b.column) }
    public var description: String { "\(line):\(column)" }
}

public struct TOMLValue: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case string(String)
        case integer(Int)
        case boolean(Bool)
        case array([TOMLValue])
    }
    public var kind: Kind
    public var position: TOMLPosition

    public init(_ kind: Kind, at position: TOMLPosition) {
        self.kind = kind
        self.position = position
    }

    /// What a user calls this kind of value, for messages.
    public var typeName: String {
        switch kind {
        case .string: "a string"
        case .integer: "an integer"
        case .boolean: "a boolean"
        case .array: "an array"
        }
    }
}

/// One `key = value` line; `table` is the `[table]` it sits under (nil: the top level).
public struct TOMLEntry: Sendable, Equatable {
    public var table: String?
    public var key: String
    public var keyPosition: TOMLPosition
    public var value: TOMLValue
}

public struct TOMLDocument: Sendable, Equatable {
    /// In the file's order.
    public var entries: [TOMLEntry] = []
    /// Each `[table]` header and where it is.
    public var tables: [(name: String, position: TOMLPosition)] = []

    public static func == (a: Self, b: Self) -> Bool {
        a.entries == b.entries && a.tables.map(\.name) == b.tables.map(\.name) && a.tables.map(\.position) == b.tables.map(\.position)
    }

    public func entries(in table: String?) -> [TOMLEntry] { entries.filter { $0.table == table } }

    /// Parses `text`; the first syntax error stops it (what follows a broken line cannot
    /// be trusted).
    public static func parse(_ text: String) throws(TOMLError) -> TOMLDocument {
        var parser = TOMLParser(text)
        return try parser.document()
    }
}

public struct TOMLError: Error, Sendable, Equatable, CustomStringConvertible {
    public var position: TOMLPosition
    public var message: String
    public var description: String { "\(position): \(message)" }
}

struct TOMLParser {
    private let scalars: [Unicode.Scalar]
    private var index = 0
    private var line = 1
    private var column = 1

    init(_ text: String) { scalars = Array(text.unicodeScalars) }

    private var position: TOMLPosition { TOMLPosition(line: line, column: column) }
    private var current: Unicode.Scalar? { index < scalars.count ? scalars[index] : nil }
    private func peek(_ offset: Int) -> Unicode.Scalar? { index + offset < scalars.count ? scalars[index + offset] : nil }

    private mutating func advance() {
        guard let c = current else { return }
        index += 1
        if c == "\n" {
            line += 1
            column = 1
        } else {
            column += 1
        }
    }

    private func fail(_ message: String, at position: TOMLPosition? = nil) -> TOMLError {
        TOMLError(position: position ?? self.position, message: message)
    }

    private static func isBareKey(_ c: Unicode.Scalar) -> Bool {
        ("a"..."z").contains(c) || ("A"..."Z").contains(c) || ("0"..."9").contains(c) || c == "-" || c == "_"
    }

    private mutating func skipSpaces() {
        while let c = current, c == " " || c == "\t" { advance() }
    }

    /// Spaces, a comment, then the end of the line (or of the file).
    private mutating func endOfLine() throws(TOMLError) {
        skipSpaces()
        if current == "#" { try comment() }
        if current == "\r" && peek(1) == "\n" { advance() }
        guard let c = current else { return }
        guard c == "\n" else { throw fail("expected the end of the line, found '\(c)'") }
        advance()
    }

    private mutating func comment() throws(TOMLError) {
        while let c = current, c != "\n" {
            if c == "\r" && peek(1) == "\n" { return }
            if c.value < 0x20 && c != "\t" || c.value == 0x7f { throw fail("control character U+\(hex(c.value)) in a comment") }
            advance()
        }
    }

    /// Blank lines and comments between values of a multi-line array.
    private mutating func skipBlank() throws(TOMLError) {
        while true {
            skipSpaces()
            if current == "#" { try comment() }
            if current == "\r" && peek(1) == "\n" { advance() }
            if current == "\n" { advance() } else { return }
        }
    }

    mutating func document() throws(TOMLError) -> TOMLDocument {
        var doc = TOMLDocument()
        var table: String?
        var seen: Set<[String?]> = []
        var tablesSeen: Set<String> = []
        while true {
            try skipBlank()
            guard let c = current else { return doc }
            let start = position
            if c == "[" {
                advance()
                if current == "[" { throw fail("arrays of tables ([[...]]) are not supported here", at: start) }
                skipSpaces()
                let name = try key()
                skipSpaces()
                if current == "." { throw fail("nested tables are not supported here") }
                guard current == "]" else { throw fail("expected ']' to close the table header") }
                advance()
                try endOfLine()
                guard tablesSeen.insert(name).inserted, !seen.contains([nil, name]) else {
                    throw fail("table '\(name)' is defined twice", at: start)
                }
                table = name
                doc.tables.append((name, start))
                continue
            }
            let name = try key()
            skipSpaces()
            if current == "." { throw fail("dotted keys are not supported here; use a [table]") }
            guard current == "=" else { throw fail("expected '=' after the key '\(name)'") }
            advance()
            skipSpaces()
            let value = try self.value()
            try endOfLine()
            guard seen.insert([table, name]).inserted, !(table == nil && tablesSeen.contains(name)) else {
                throw fail("key '\(name)' is defined twice", at: start)
            }
            doc.entries.append(TOMLEntry(table: table, key: name, keyPosition: start, value: value))
        }
    }

    private mutating func key() throws(TOMLError) -> String {
        guard let c = current else { throw fail("expected a key, found the end of the file") }
        if c == "\"" {
            if peek(1) == "\"" && peek(2) == "\"" { throw fail("a key cannot be a multi-line string") }
            return try basicString()
        }
        if c == "'" { return try literalString() }
        var name = ""
        while let c = current, Self.isBareKey(c) {
            name.unicodeScalars.append(c)
            advance()
        }
        guard !name.isEmpty else {
            throw fail(c == "\n" || c == "\r" ? "expected a key, found the end of the line" : "expected a key, found '\(c)'")
        }
        return name
    }

    private mutating func value() throws(TOMLError) -> TOMLValue {
        let start = position
        guard let c = current, c != "\n", c != "#" else { throw fail("expected a value") }
        switch c {
        case "\"":
            if peek(1) == "\"" && peek(2) == "\"" { throw fail("multi-line strings are not supported here") }
            return TOMLValue(.string(try basicString()), at: start)
        case "'":
            if peek(1) == "'" && peek(2) == "'" { throw fail("multi-line strings are not supported here") }
            return TOMLValue(.string(try literalString()), at: start)
        case "[":
            return try array()
        case "{":
            throw fail("inline tables are not supported here; use a [table]")
        default:
            var word = ""
            while let c = current, Self.isBareKey(c) || c == "+" || c == "." || c == ":" {
                word.unicodeScalars.append(c)
                advance()
            }
            if word == "true" { return TOMLValue(.boolean(true), at: start) }
            if word == "false" { return TOMLValue(.boolean(false), at: start) }
            guard !word.isEmpty else { throw fail("expected a value, found '\(c)'") }
            if let n = Self.integer(word) { return TOMLValue(.integer(n), at: start) }
            if word.first?.isNumber == true || word.first == "+" || word.first == "-" {
                if word.contains(".") || word.contains("e") || word.contains("E") || word.contains(":") || word.dropFirst().contains("-") {
                    throw fail("'\(word)' is a float or a date; only integers are supported here", at: start)
                }
                throw fail("'\(word)' is not a valid integer", at: start)
            }
            throw fail("'\(word)' is not a value (strings need quotes: \"\(word)\")", at: start)
        }
    }

    /// Decimal, optional sign, `_` only between digits, no leading zero.
    static func integer(_ word: String) -> Int? {
        var digits = Substring(word)
        var negative = false
        if let s = digits.first, s == "+" || s == "-" {
            negative = s == "-"
            digits = digits.dropFirst()
        }
        guard let first = digits.first, first.isASCII, first.isNumber, let last = digits.last, last.isASCII, last.isNumber else { return nil }
        guard !(digits.count > 1 && first == "0") else { return nil }
        guard !digits.contains("__"), digits.allSatisfy({ ($0.isASCII && $0.isNumber) || $0 == "_" }) else { return nil }
        guard let magnitude = Int(digits.replacingOccurrences(of: "_", with: "")) else { return nil }
        return negative ? -magnitude : magnitude
    }

    private mutating func array() throws(TOMLError) -> TOMLValue {
        let start = position
        advance()  // [
        var items: [TOMLValue] = []
        while true {
            try skipBlank()
            guard let c = current else { throw fail("the array is not closed (no ']')", at: start) }
            if c == "]" {
                advance()
                return TOMLValue(.array(items), at: start)
            }
            items.append(try value())
            try skipBlank()
            if current == "," {
                advance()
                continue
            }
            guard current == "]" else {
                throw current == nil ? fail("the array is not closed (no ']')", at: start) : fail("expected ',' or ']' in the array")
            }
        }
    }

    private mutating func basicString() throws(TOMLError) -> String {
        let start = position
        advance()  // "
        var out = String.UnicodeScalarView()
        while true {
            guard let c = current, c != "\n", c != "\r" else { throw fail("the string is not closed on its line", at: start) }
            if c == "\"" {
                advance()
                return String(out)
            }
            if c == "\\" {
                let escape = position
                advance()
                guard let e = current else { throw fail("the string is not closed on its line", at: start) }
                advance()
                switch e {
                case "b": out.append("\u{08}")
                case "t": out.append("\t")
                case "n": out.append("\n")
                case "f": out.append("\u{0C}")
                case "r": out.append("\r")
                case "\"": out.append("\"")
                case "\\": out.append("\\")
                case "u", "U":
                    let count = e == "u" ? 4 : 8
                    var digits = ""
                    for _ in 0..<count {
                        guard let d = current, d.properties.isASCIIHexDigit else {
                            throw fail("\\\(e) needs \(count) hexadecimal digits", at: escape)
                        }
                        digits.unicodeScalars.append(d)
                        advance()
                    }
                    guard let value = UInt32(digits, radix: 16), let scalar = Unicode.Scalar(value) else {
                        throw fail("\\\(e)\(digits) is not a Unicode scalar value", at: escape)
                    }
                    out.append(scalar)
                default:
                    throw fail("unknown escape '\\\(e)'", at: escape)
                }
                continue
            }
            if c.value < 0x20 && c != "\t" || c.value == 0x7f { throw fail("control character U+\(hex(c.value)) in a string; escape it") }
            out.append(c)
            advance()
        }
    }

    private mutating func literalString() throws(TOMLError) -> String {
        let start = position
        advance()  // '
        var out = String.UnicodeScalarView()
        while true {
            guard let c = current, c != "\n", c != "\r" else { throw fail("the string is not closed on its line", at: start) }
            if c == "'" {
                advance()
                return String(out)
            }
            if c.value < 0x20 && c != "\t" || c.value == 0x7f { throw fail("control character U+\(hex(c.value)) in a string") }
            out.append(c)
            advance()
        }
    }
}

private func hex(_ value: UInt32) -> String {
    let digits = String(value, radix: 16, uppercase: true)
    return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
}
