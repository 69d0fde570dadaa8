@testable import FerryMigration
import FerryIO
import FerryVM
import FerryWire
import Foundation
import Testing

@Suite("Queueing and stopping: the admission line, outgoing slots, the commit point")
struct QueueingTests {
    @Test("--max-migrations: first come first served, a place freed goes to the next, a leaver leaves the line")
    func admissionLine() {
        let snapshots = Locked<[IncomingMigrations]>([])
        let queue = AdmissionQueue(limit: 2) { s in snapshots.withLock { $0.append(s) } }
        for (i, vm) in ["v1", "v2", "v3", "v4"].enumerated() { queue.enqueue(session: "s\(i + 1)", vm: vm, source: "a") }
        #expect(queue.wait(session: "s1", timeout: .milliseconds(1)) == nil, "the first two run at once")
        #expect(queue.wait(session: "s2", timeout: .milliseconds(1)) == nil)
        #expect(queue.wait(session: "s3", timeout: .milliseconds(1)).map { [$0.position, $0.length] } == [1, 2])
        #expect(queue.wait(session: "s4", timeout: .milliseconds(1)).map { [$0.position, $0.length] } == [2, 2])
        queue.remove(session: "s4")  // gave up in line
        queue.remove(session: "s1")  // finished
        #expect(queue.wait(session: "s3", timeout: .milliseconds(1)) == nil, "s3 took s1's place")
        let last = queue.snapshot
        #expect(last.running.map(\.vm) == ["v2", "v3"] && last.queued.isEmpty)
        #expect(last.running[1].admittedAt != nil)
        #expect(snapshots.current.count == 6, "every change is published for ferry status")
    }

    @Test("two sessions that join at once: the last picture published is the last one made")
    func admissionPublishesInOrder() {
        // The first session's publication is held up (a slow disk under the run directory)
        // while the second joins the line. The file must end with both: one running, one queued.
        let snapshots = Locked<[IncomingMigrations]>([])
        let firstCall = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let calls = Locked(0)
        let queue = AdmissionQueue(limit: 1) { s in
            let n = calls.withLock { $0 += 1; return $0 }
            if n == 1 { firstCall.signal(); release.wait() }
            snapshots.withLock { $0.append(s) }
        }
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) { queue.enqueue(session: "s1", vm: "v1", source: "a") }
        firstCall.wait()
        DispatchQueue.global().async(group: group) { queue.enqueue(session: "s2", vm: "v2", source: "a") }
        // Let s2 join (its publication waits its turn), then let s1's publication finish.
        let joined = ContinuousClock.now + .seconds(5)
        while queue.snapshot.queued.isEmpty && ContinuousClock.now < joined { Thread.sleep(forTimeInterval: 0.005) }
        release.signal()
        group.wait()
        let last = snapshots.current.last
        #expect(last?.running.map(\.vm) == ["v1"] && last?.queued.map(\.vm) == ["v2"],
                "the file would end with an older picture: \(String(describing: last))")
    }

    @Test("a waiter is woken when its turn comes")
    func admissionWakes() {
        let queue = AdmissionQueue(limit: 1) { _ in }
        queue.enqueue(session: "s1", vm: "v1", source: "a")
        queue.enqueue(session: "s2", vm: "v2", source: "a")
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.1) { queue.remove(session: "s1") }
        let started = Date()
        #expect(queue.wait(session: "s2", timeout: .seconds(5)) == nil)
        #expect(Date().timeIntervalSince(started) < 2)
    }

    @Test("outgoing slots: at most the limit are held; the next in line gets a freed one; status sees holders")
    func outgoingSlots() throws {
        let dir = NSTemporaryDirectory() + "ferry-slots-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var first: OutgoingSlot? = try OutgoingSlot.acquire(runDirectory: dir, limit: 2, vm: "v1", waiting: { _, _ in }, check: {})
        let second = try OutgoingSlot.acquire(runDirectory: dir, limit: 2, vm: "v2", waiting: { _, _ in }, check: {})
        #expect(first?.slot != second.slot)
        #expect(OutgoingSlot.snapshot(runDirectory: dir).holders.map(\.vm).sorted() == ["v1", "v2"])
        // A third waits in line (told its place) until the first is released.
        var told: [Int] = []
        var polls = 0
        let third = try OutgoingSlot.acquire(runDirectory: dir, limit: 2, vm: "v3", waiting: { position, _ in
            told.append(position)
            polls += 1
            if polls == 2 { first = nil }
        }, check: {})
        #expect(told.first == 1)
        #expect(third.slot == 0 || third.slot == 1)
        #expect(first == nil)
        #expect(OutgoingSlot.waiters(dir).isEmpty, "the ticket is gone once the slot is taken")
        // A check that throws (a cancel, a timeout) ends the wait.
        struct Stop: Error {}
        #expect(throws: Stop.self) {
            _ = try OutgoingSlot.acquire(runDirectory: dir, limit: 2, vm: "v4", waiting: { _, _ in }, check: { throw Stop() })
        }
        _ = (second, third)
    }

    @Test("a stop is granted before the commit point and refused after it")
    func commitPoint() {
        let before = MigrationInterrupt()
        let woken = Locked(0)
        before.onStop { woken.withLock { $0 += 1 } }
        #expect(before.request(.cancelled) == .accepted)
        #expect(before.request(.timedOut(seconds: 5)) == .alreadyRequested)
        #expect(woken.current == 1)
        #expect {
            try before.passCommitPoint()
        } throws: { error in
            guard case .stopped(.cancelled)? = error as? MigrateError else { return false }
            return true
        }

        let after = MigrationInterrupt()
        #expect(throws: Never.self) { try after.passCommitPoint() }
        #expect(after.request(.cancelled) == .tooLate)
        #expect(after.lateRequests == [.cancelled])
        #expect(throws: Never.self) { try after.check() }
        #expect(StopRequest.timedOut(seconds: 5).message == "timed out after 5 s (--timeout)")
    }

    @Test("status frames carry the place in line as optional fields")
    func statusFields() throws {
        let plain = try JSONDecoder().decode(StatusMessage.self, from: Data(#"{"text":"x"}"#.utf8))
        #expect(plain.queuePosition == nil)
        let queued = StatusMessage(text: "queued", queuePosition: 1, queueLength: 2, queuedSeconds: 3)
        let back = try JSONDecoder().decode(StatusMessage.self, from: JSONEncoder().encode(queued))
        #expect(back == queued)
    }
}
