import FerryIO
import FerryTransport
import FerryWire
import Foundation

/// A thread-safe FIFO that one thread waits on with a timeout.
final class EventQueue<Event: Sendable>: @unchecked Sendable {
    private let condition = NSCondition()
    private var items: [Event] = []

    func post(_ event: Event) {
        condition.lock()
        items.append(event)
        condition.signal()
        condition.unlock()
    }

    /// The next event, or nil after `timeout`.
    func next(timeout: Duration) -> Event? {
        condition.lock()
        defer { condition.unlock() }
        let deadline = Date().addingTimeInterval(timeout.seconds)
        while items.isEmpty {
            if !condition.wait(until: deadline) { return nil }
        }
        return items.removeFirst()
    }
}

/// Errors of a migration: the phase it was in and what went wrong there.
public struct MigrationError: Error, CustomStringConvertible, Sendable {
    public var phase: MigrationPhase
    public var message: String
    public init(_ phase: MigrationPhase, _ message: String) {
        self.phase = phase
        self.message = message
    }
    public var description: String { "\(phase.rawValue): \(message)" }
}

/// Phases of a migration, in order.
public enum MigrationPhase: String, Codable, Sendable {
    case preparing
    /// Waiting in line: for one of this host's outgoing slots, or at the destination.
    case queued
    case connecting
    case negotiating
    case sendingBootFiles = "sending-boot-files"
    case startingDestination = "starting-destination"
    case openingChannels = "opening-channels"
    case transferring
    case switchover
    case committing
    case done
}

/// Monotonic seconds since an origin.
struct Stopwatch: Sendable {
    let start = ContinuousClock.now
    var elapsed: Double { (ContinuousClock.now - start).seconds }
}
