import ArgumentParser
import Dispatch
import FerryIO
import Foundation

/// `ferry probe ADDRESS`: what a VM's users see of its network while it moves.
struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Probe a guest's echo service (UDP every 10 ms, one TCP connection) until Ctrl-C/SIGTERM or --seconds.",
        discussion: """
            Counts the UDP probes that never came back and the longest time the guest did not answer ("lost 3 probes \
            (31 ms of outage)"), and checks that the TCP connection stays open and echoes every byte. Run it from where \
            the VM's users are (in the lab: ferry lab exec client -- ferry probe 10.78.0.10) while a migration runs. \
            The guest needs an echo service on the port (the demo guest's ferry-netecho). Exit status 1 if the TCP \
            connection broke or nothing ever answered.
            """)

    @Argument(help: "The guest's IPv4 address.")
    var address: String

    @Option(help: "The echo port, UDP and TCP (default: 7).")
    var port: UInt16 = 7

    @Option(help: "Milliseconds between UDP probes (default: 10).")
    var intervalMs = 10

    @Flag(help: "UDP only, no TCP connection.")
    var noTCP = false

    @Option(help: "Stop after this many seconds (default: run until Ctrl-C or SIGTERM).")
    var seconds: Double?

    @Option(help: "Also write the result as JSON to this file.")
    var json: String?

    @Flag(help: "No progress line every second.")
    var quiet = false

    func validate() throws {
        guard (1...1000).contains(intervalMs) else { throw ValidationError("--interval-ms must be between 1 and 1000") }
        if let seconds, seconds <= 0 { throw ValidationError("--seconds must be positive") }
    }

    func run() throws {
        var options = NetworkProbe.Options(host: address, port: port)
        options.interval = .milliseconds(intervalMs)
        options.tcp = !noTCP
        let probe: NetworkProbe
        do { probe = try NetworkProbe(options) } catch { throw UserError("ferry probe: \(error)") }
        let stop = DispatchSemaphore(value: 0)
        var sources: [DispatchSourceSignal] = []
        for number in [SIGINT, SIGTERM] {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { stop.signal() }
            source.resume()
            sources.append(source)
        }
        let started = Date()
        while stop.wait(timeout: .now() + 1) == .timedOut {
            if let seconds, Date().timeIntervalSince(started) >= seconds { break }
            if !quiet {
                let r = probe.result()
                print("probe \(address): \(r.sent) sent, \(r.lost) lost, round trip \(String(format: "%.1f", r.medianRoundTripMilliseconds)) ms"
                      + (options.tcp ? ", TCP \(r.tcpBroken == nil ? "\(r.tcpBytesEchoed) bytes echoed" : "broken")" : ""))
                fflush(nil)
            }
        }
        let result = probe.stop()
        for source in sources { source.cancel() }
        print("probe \(address): " + result.summary)
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            do { try encoder.encode(result).write(to: URL(fileURLWithPath: json)) } catch {
                throw UserError("ferry probe: cannot write \(json): \(error)")
            }
        }
        if result.answered == 0 || (options.tcp && (!result.tcpConnected || result.tcpBroken != nil)) { throw ExitCode(1) }
    }
}
