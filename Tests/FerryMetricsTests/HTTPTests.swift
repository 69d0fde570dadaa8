import FerryIO
import Foundation
import Testing
@testable import FerryMetrics

/// Sends `request` to the server on loopback and reads until it closes.
func exchange(port: UInt16, _ request: [UInt8], readTimeout: Duration = .seconds(5)) throws -> String {
    let socket = try Socket.connectTCP(host: "127.0.0.1", port: port)
    defer { socket.close() }
    socket.setReceiveTimeout(readTimeout)
    if !request.isEmpty { try socket.writeAll(request) }
    var answer: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = try buffer.withUnsafeMutableBytes { try socket.read(into: $0) }
        if n == 0 { break }
        answer += buffer[0..<n]
    }
    return String(decoding: answer, as: UTF8.self)
}

func get(_ path: String, method: String = "GET") -> [UInt8] {
    Array("\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\nAccept: */*\r\n\r\n".utf8)
}

@Suite("Metrics: the /metrics responder over real loopback sockets")
struct HTTPTests {
    func server(_ limits: MetricsServer.Limits = .init()) throws -> (MetricsServer, HostMetrics) {
        let metrics = HostMetrics()
        metrics.apply(MetricsEvent(kind: .started, vm: "vm", role: .source))
        let server = try MetricsServer(address: MetricsAddress(port: 0), limits: limits) { metrics.exposition() }
        return (server, metrics)
    }

    @Test("GET /metrics answers the exposition with Prometheus's content type")
    func scrape() throws {
        let (server, _) = try server()
        defer { server.stop() }
        let answer = try exchange(port: server.port, get("/metrics"))
        #expect(answer.hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(answer.contains("Content-Type: text/plain; version=0.0.4"))
        #expect(answer.contains("Connection: close\r\n"))
        let body = String(answer[answer.range(of: "\r\n\r\n")!.upperBound...])
        #expect(answer.contains("Content-Length: \(body.utf8.count)\r\n"))
        #expect(PrometheusText.parse(body)[PrometheusText.key("ferry_migrations_started_total", ["role": "source"])] == 1)
    }

    @Test("another path is 404, another method 405, a non-HTTP line 400")
    func refusals() throws {
        let (server, _) = try server()
        defer { server.stop() }
        #expect(try exchange(port: server.port, get("/")).hasPrefix("HTTP/1.1 404 "))
        #expect(try exchange(port: server.port, get("/metrics/x")).hasPrefix("HTTP/1.1 404 "))
        let post = try exchange(port: server.port, get("/metrics", method: "POST"))
        #expect(post.hasPrefix("HTTP/1.1 405 ") && post.contains("Allow: GET\r\n"))
        #expect(try exchange(port: server.port, Array("hello there\r\n\r\n".utf8)).hasPrefix("HTTP/1.1 400 "))
        // The query string does not change the path.
        #expect(try exchange(port: server.port, get("/metrics?x=1")).hasPrefix("HTTP/1.1 200 "))
    }

    @Test("a request that never ends times out, and the server serves others meanwhile")
    func slowClient() throws {
        var limits = MetricsServer.Limits()
        limits.requestTimeout = .milliseconds(300)
        let (server, _) = try server(limits)
        defer { server.stop() }
        let start = ContinuousClock.now
        let slow = try Socket.connectTCP(host: "127.0.0.1", port: server.port)
        defer { slow.close() }
        try slow.writeAll(Array("GET /metrics HTTP/1.1\r\n".utf8))
        // Meanwhile another scrape is answered.
        #expect(try exchange(port: server.port, get("/metrics")).hasPrefix("HTTP/1.1 200 "))
        // Trickling bytes does not extend the deadline.
        for _ in 0..<4 {
            try? slow.writeAll(Array("X".utf8))
            Thread.sleep(forTimeInterval: 0.05)
        }
        slow.setReceiveTimeout(.seconds(5))
        var buffer = [UInt8](repeating: 0, count: 1024)
        let n = try buffer.withUnsafeMutableBytes { try slow.read(into: $0) }
        #expect(String(decoding: buffer[0..<n], as: UTF8.self).hasPrefix("HTTP/1.1 408 "))
        #expect(ContinuousClock.now - start < .seconds(2))
    }

    @Test("an oversized request is refused with 431")
    func oversized() throws {
        var limits = MetricsServer.Limits()
        limits.requestByteCount = 1024
        let (server, _) = try server(limits)
        defer { server.stop() }
        var request = Array("GET /metrics HTTP/1.1\r\n".utf8)
        request += Array("X-Padding: \(String(repeating: "a", count: 4000))\r\n\r\n".utf8)
        #expect(try exchange(port: server.port, request).hasPrefix("HTTP/1.1 431 "))
    }

    @Test("connections past the limit are closed at once, not queued behind slow ones")
    func connectionCap() throws {
        var limits = MetricsServer.Limits()
        limits.connections = 2
        limits.requestTimeout = .seconds(3)
        let (server, _) = try server(limits)
        defer { server.stop() }
        let holders = try (0..<2).map { _ in try Socket.connectTCP(host: "127.0.0.1", port: server.port) }
        defer { holders.forEach { $0.close() } }
        #expect(eventually { server.activeConnections == 2 })
        let start = ContinuousClock.now
        #expect(try exchange(port: server.port, []).isEmpty)
        #expect(ContinuousClock.now - start < .seconds(1))
    }

    @Test("the request head parses the same fed whole or a byte at a time")
    func headParsing() {
        let request = get("/metrics")
        for cut in 0..<(request.count - 1) {
            #expect(HTTPRequestHead.parse(Array(request[0..<cut])) == .incomplete)
        }
        #expect(HTTPRequestHead.parse(request) == .complete(HTTPRequestHead(method: "GET", path: "/metrics")))
        #expect(HTTPRequestHead.parse(Array("GET /metrics\r\n\r\n".utf8)) == .malformed)
        #expect(HTTPRequestHead.parse(Array("GET metrics HTTP/1.1\r\n\r\n".utf8)) == .malformed)
    }

    @Test("--metrics and FERRY_METRICS: [HOST:]PORT, loopback by default, flag first, empty is off")
    func addresses() throws {
        #expect(MetricsAddress(parsing: "9464") == MetricsAddress(host: "127.0.0.1", port: 9464))
        #expect(MetricsAddress(parsing: "0.0.0.0:9464") == MetricsAddress(host: "0.0.0.0", port: 9464))
        #expect(MetricsAddress(parsing: "[::1]:9464") == MetricsAddress(host: "::1", port: 9464))
        #expect(MetricsAddress(parsing: "host.example:80") == MetricsAddress(host: "host.example", port: 80))
        for bad in ["", "x", "::1:9464", "1.2.3.4:", ":9464", "70000", "[::1]9464", "a:b"] {
            #expect(MetricsAddress(parsing: bad) == nil, "\(bad)")
        }
        #expect(try MetricsAddress.resolve(flag: nil, environment: [:]) == nil)
        #expect(try MetricsAddress.resolve(flag: nil, environment: ["FERRY_METRICS": ""]) == nil)
        #expect(try MetricsAddress.resolve(flag: nil, environment: ["FERRY_METRICS": "9100"]) == MetricsAddress(port: 9100))
        #expect(try MetricsAddress.resolve(flag: "9200", environment: ["FERRY_METRICS": "9100"]) == MetricsAddress(port: 9200))
        #expect(throws: MetricsAddressError.self) { try MetricsAddress.resolve(flag: nil, environment: ["FERRY_METRICS": "nope"]) }
        #expect(MetricsAddress(host: "::1", port: 1).description == "[::1]:1")
    }
}
