import Foundation

/// A reader of the Prometheus text format, for tests and tools that scrape Ferry: each
/// sample line becomes a key, the metric name with its labels sorted by name
/// (`ferry_nic_bytes_total{direction="sent",nic="eth0"}`, or just the name without labels),
/// and its value. Comments, blank lines and timestamps are skipped; a line it cannot read
/// is skipped too.
public enum PrometheusText {
    public static func parse(_ text: String) -> [String: Double] {
        var samples: [String: Double] = [:]
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            let line = line.trimmingCharacters(in: .whitespaces)
            guard !line.isEmpty, !line.hasPrefix("#"), let (key, value) = sample(line) else { continue }
            samples[key] = value
        }
        return samples
    }

    /// The key of metric `name` with `labels`, as ``parse(_:)`` writes it.
    public static func key(_ name: String, _ labels: [String: String] = [:]) -> String {
        guard !labels.isEmpty else { return name }
        return name + "{" + labels.sorted { $0.key < $1.key }.map { "\($0.key)=\"\(escape($0.value))\"" }.joined(separator: ",") + "}"
    }

    private static func sample(_ line: String) -> (String, Double)? {
        let chars = Array(line)
        var i = 0
        while i < chars.count, chars[i] != "{", chars[i] != " ", chars[i] != "\t" { i += 1 }
        let name = String(chars[0..<i])
        guard !name.isEmpty else { return nil }
        var labels: [String: String] = [:]
        if i < chars.count, chars[i] == "{" {
            i += 1
            while true {
                while i < chars.count, chars[i] == " " || chars[i] == "," { i += 1 }
                guard i < chars.count else { return nil }
                if chars[i] == "}" {
                    i += 1
                    break
                }
                let start = i
                while i < chars.count, chars[i] != "=" { i += 1 }
                guard i + 1 < chars.count, chars[i + 1] == "\"" else { return nil }
                let label = String(chars[start..<i]).trimmingCharacters(in: .whitespaces)
                i += 2
                var value = ""
                while i < chars.count, chars[i] != "\"" {
                    if chars[i] == "\\", i + 1 < chars.count {
                        i += 1
                        value.append(chars[i] == "n" ? "\n" : chars[i])
                    } else {
                        value.append(chars[i])
                    }
                    i += 1
                }
                guard i < chars.count else { return nil }
                i += 1
                labels[label] = value
            }
        }
        let rest = String(chars[i...]).split(whereSeparator: { $0 == " " || $0 == "\t" })
        guard let first = rest.first, let value = number(String(first)) else { return nil }
        return (key(name, labels), value)
    }

    private static func number(_ text: String) -> Double? {
        switch text {
        case "+Inf", "Inf": return .infinity
        case "-Inf": return -.infinity
        case "NaN": return .nan
        default: return Double(text)
        }
    }

    private static func escape(_ value: String) -> String {
        value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }
}
