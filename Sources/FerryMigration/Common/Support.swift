import FerryIO
import FerryTransport
import FerryWire
import Foundation

/// A FIFO that any thread posts to and one thread, the migration's, waits on with a
/// timeout: how a migration's helper threads (control reader, data path, QMP events,
/// timer) reach the thread that owns the migration's state.
///
/// `@unchecked Sendable`: `items` is touched only under `monitor`.
final class EventQueue<Event: Sendable>: @unchecked Sendable {
    private let monitor = Monitor()
    private let posted: Monitor.Condition
    private var items: [Event] = []

    init() { posted = monitor.makeCondition() }

    func post(_ event: Event) {
        monitor.withLock {
            items.append(event)
            posted.signal()
        }
    }

    /// The next event, or nil after `timeout`.
    func next(timeout: Duration) -> Event? {
        monitor.withLock {
            let deadline = ContinuousClock.now + timeout
            while items.isEmpty {
                if !posted.wait(until: deadline) && items.isEmpty { return nil }
            }
            return items.removeFirst()
        }
    }
}

/// Monotonic seconds since an origin.
struct Stopwatch: Sendable {
    let start = ContinuousClock.now
    var elapsed: Double { (ContinuousClock.now - start).seconds }
}

extension FrameConnection {
    /// Reads this control connection on a thread of its own from now on: each frame goes
    /// to `frame`, and the reason it ended (once) to `lost`. The thread that owns the
    /// migration then waits on its event queue alone.
    func startReader(_ name: String, frame: @escaping @Sendable (Frame) -> Void, lost: @escaping @Sendable (String) -> Void) {
        startThread(name) { [self] in
            while true {
                do {
                    frame(try receive())
                } catch {
                    lost("\(error)")
                    return
                }
            }
        }
    }
}
