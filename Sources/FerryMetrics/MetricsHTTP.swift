import FerryIO
import Foundation

/// `--metrics [HOST:]PORT` and `FERRY_METRICS`: where `/metrics` is served. No host is
/// loopback (127.0.0.1): metrics say which VMs move where, so exposing them beyond the
/// host is the operator's choice. An IPv6 host goes in brackets (`[::1]:9464`).
public struct MetricsAddress: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String = "127.0.0.1", port: UInt16) {
        self.host = host
        self.port = port
    }

    /// nil if `text` is not `[HOST:]PORT`.
    public init?(parsing text: String) {
        let text = text.trimmingCharacters(in: .whitespaces)
        var host = "127.0.0.1"
        var portText = Substring(text)
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else { return nil }
            host = String(text[text.index(after: text.startIndex)..<close])
            portText = text[text.index(close, offsetBy: 2)...]
        } else if let colon = text.lastIndex(of: ":") {
            host = String(text[..<colon])
            guard !host.contains(":") else { return nil }  // IPv6 without brackets
            portText = text[text.index(after: colon)...]
        }
        guard !host.isEmpty, let port = UInt16(portText) else { return nil }
        self.init(host: host, port: port)
    }

    /// The variable a config file's key maps onto (set by the service, read when the flag is absent).
    public static let environmentVariable = "FERRY_METRICS"

    /// The flag if given, else `FERRY_METRICS` (empty or unset: off). Throws the text it cannot read.
    public static func resolve(flag: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws(MetricsAddressError) -> MetricsAddress? {
        if let flag {
            guard let address = MetricsAddress(parsing: flag) else { throw MetricsAddressError(text: flag, source: "--metrics") }
            return address
        }
        guard let text = environment[environmentVariable], !text.trimmingCharacters(in: .whitespaces).isEmpty else { return nil }
        guard let address = MetricsAddress(parsing: text) else { throw MetricsAddressError(text: text, source: environmentVariable) }
        return address
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

public struct MetricsAddressError: Error, CustomStringConvertible, Sendable {
    public var text: String
    public var source: String
    public var description: String { "\(source) '\(text)' is not [HOST:]PORT (e.g. 9464, 0.0.0.0:9464, [::1]:9464)" }
}

/// One HTTP/1.1 request head, as far as `/metrics` needs it: a value, no socket.
public struct HTTPRequestHead: Sendable, Equatable {
    public var method: String
    public var path: String

    public enum Parse: Sendable, Equatable {
        /// The head's blank line has not come yet.
        case incomplete
        case complete(HTTPRequestHead)
        /// Not an HTTP request line.
        case malformed
    }

    /// Reads the head from the bytes received so far.
    public static func parse(_ bytes: [UInt8]) -> Parse {
        let end: [UInt8] = [13, 10, 13, 10]
        guard bytes.count >= 4, let blank = (0...(bytes.count - 4)).first(where: { bytes[$0..<($0 + 4)].elementsEqual(end) }) else {
            return .incomplete
        }
        guard let lineEnd = bytes[..<(blank + 2)].firstIndex(of: 13),
              let line = String(bytes: bytes[..<lineEnd], encoding: .utf8) else { return .malformed }
        let parts = line.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[0].isEmpty, parts[1].hasPrefix("/"), parts[2].hasPrefix("HTTP/1.") else { return .malformed }
        var path = String(parts[1])
        if let query = path.firstIndex(of: "?") { path = String(path[..<query]) }
        return .complete(HTTPRequestHead(method: String(parts[0]), path: path))
    }
}

/// An HTTP response: status, content type and body; ``bytes`` is what goes on the wire.
public struct HTTPResponse: Sendable, Equatable {
    public var status: Int
    public var reason: String
    public var contentType = "text/plain; charset=utf-8"
    public var extraHeaders: [(String, String)] = []
    public var body: [UInt8]

    public init(status: Int, reason: String, contentType: String = "text/plain; charset=utf-8", body: String) {
        self.status = status
        self.reason = reason
        self.contentType = contentType
        self.body = Array(body.utf8)
    }

    /// The Prometheus text format's content type (exposition format 0.0.4).
    public static let prometheusContentType = "text/plain; version=0.0.4; charset=utf-8"

    /// What the responder answers to `head`: `/metrics` for GET, 405 for
    /// another method there, 404 elsewhere.
    public static func answer(_ head: HTTPRequestHead, metrics: () -> String) -> HTTPResponse {
        guard head.path == "/metrics" else { return HTTPResponse(status: 404, reason: "Not Found", body: "not found: try /metrics\n") }
        switch head.method {
        case "GET":
            return HTTPResponse(status: 200, reason: "OK", contentType: prometheusContentType, body: metrics())
        default:
            var response = HTTPResponse(status: 405, reason: "Method Not Allowed", body: "only GET\n")
            response.extraHeaders = [("Allow", "GET")]
            return response
        }
    }

    public var bytes: [UInt8] {
        var head = "HTTP/1.1 \(status) \(reason)\r\nContent-Type: \(contentType)\r\nContent-Length: \(body.count)\r\nConnection: close\r\n"
        for (name, value) in extraHeaders { head += "\(name): \(value)\r\n" }
        head += "\r\n"
        return Array(head.utf8) + body
    }

    public static func == (a: HTTPResponse, b: HTTPResponse) -> Bool { a.bytes == b.bytes }
}
