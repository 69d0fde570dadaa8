import FerryVM
import FerryWire
import Foundation
import Testing
@testable import FerryMigration

@Suite("The incoming queue as ferry status reads it")
struct IncomingSnapshotTests {
    @Test("a running and a queued migration written by the admission line read back, strictly, as themselves")
    func runningAndQueued() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("incoming-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let queue = AdmissionQueue(limit: 1) { $0.write(runDirectory: dir) }
        queue.enqueue(session: Hex.random(byteCount: 16), vm: "vm1", source: "10.77.1.1")
        queue.enqueue(session: Hex.random(byteCount: 16), vm: "vm2", source: "10.77.1.1")
        let read = IncomingMigrations.load(runDirectory: dir)
        #expect(read.damage == nil, "\(read.damage?.problem ?? "")")
        let value = try #require(read.value)
        #expect(value.running.map(\.vm) == ["vm1"] && value.queued.map(\.vm) == ["vm2"])
    }
}
