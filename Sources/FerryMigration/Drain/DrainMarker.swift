import FerryIO
import FerryVM
import Foundation

/// `<run>/draining.json`: this host is being drained (`ferry drain`), so `ferry serve`
/// refuses incoming migrations and tells peers that ask (``HostInfoMessage/draining``).
/// The drain writes it before its first migration and removes it when it ends; a marker
/// whose process is gone (a drain killed with SIGKILL) is stale and ignored, so a crash
/// never leaves a host refusing migrations for good.
public struct DrainMarker: Codable, Sendable, Equatable {
    public var pid: Int32
    public var since: Date
    /// Where the drain sends this host's VMs.
    public var destinations: [String]

    public init(pid: Int32 = getpid(), since: Date = Date(), destinations: [String]) {
        self.pid = pid
        self.since = since
        self.destinations = destinations
    }

    public static func path(runDirectory: String) -> String { runDirectory + "/draining.json" }

    /// The marker in the file, whoever wrote it and whether it lives.
    private static func read(runDirectory: String) -> DrainMarker? {
        guard let data = FileManager.default.contents(atPath: path(runDirectory: runDirectory)) else { return nil }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try? decoder.decode(DrainMarker.self, from: data)
    }

    /// The drain in progress on this host, if its process lives.
    public static func current(runDirectory: String) -> DrainMarker? {
        guard let marker = read(runDirectory: runDirectory), marker.pid > 0,
              ProcessStats.isAlive(pid: marker.pid), ProcessStats.commandLine(pid: marker.pid)?.contains("drain") == true
        else { return nil }
        return marker
    }

    /// Puts the marker in place; fails if another live drain holds it.
    public func write(runDirectory: String) throws {
        if let other = Self.current(runDirectory: runDirectory), other.pid != pid {
            throw VMError.io("this host is already being drained (ferry drain pid \(other.pid), since \(other.since))")
        }
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        let data = try encoder.encode(self)
        try data.write(to: URL(fileURLWithPath: Self.path(runDirectory: runDirectory)), options: .atomic)
    }

    /// Removes the marker if it is this process's.
    public static func remove(runDirectory: String) {
        if read(runDirectory: runDirectory)?.pid == getpid() {
            try? FileManager.default.removeItem(atPath: path(runDirectory: runDirectory))
        }
    }
}
