import FerryIO
import Foundation

/// The daemon's end of ``MetricsReporter``: a Unix datagram socket at
/// `<run>/metrics.sock` (mode 0600: only root, who runs migrations, may report), read by
/// one thread that hands each event to ``HostMetrics/apply(_:)``. A datagram that is not
/// an event (malformed, another version, larger than ``MetricsEvent/maximumByteCount``) is
/// dropped and counted in ``droppedCount``.
///
/// Datagrams, not a stream: a reporter needs no connection to set up or keep, a daemon
/// restart leaves nothing stale in the reporters, and a full queue makes the sender drop
/// the event instead of waiting (a migration is never slowed by its metrics).
// `stopped` and `dropped` are under `lock`; the rest is immutable.
public final class MetricsReceiver: @unchecked Sendable {
    public let path: String
    private let socket: UnixDatagram
    private let metrics: HostMetrics
    private let lock = Monitor()
    private var stopped = false
    private var dropped = 0
    private var applied = 0
    private let done = DispatchSemaphore(value: 0)

    /// Binds the socket and starts its thread.
    public init(path: String, metrics: HostMetrics) throws(SocketError) {
        self.path = path
        self.metrics = metrics
        socket = try UnixDatagram.receiver(path: path)
        startThread("ferry-metrics-rx") { [self] in run() }
    }

    /// Datagrams that were not events.
    public var droppedCount: Int { lock.withLock { dropped } }
    /// Events applied.
    public var appliedCount: Int { lock.withLock { applied } }

    private func run() {
        defer { done.signal() }
        // The poll's timeout is how soon stop() is noticed.
        while !lock.withLock({ stopped }) {
            guard let datagram = socket.receive(capacity: MetricsEvent.maximumByteCount, timeout: .milliseconds(200)) else { continue }
            if let event = MetricsEvent.decode(datagram) {
                metrics.apply(event)
                lock.withLock { applied += 1 }
            } else {
                lock.withLock { dropped += 1 }
            }
        }
    }

    /// Stops the thread, closes the socket and removes its file.
    public func stop() {
        let first = lock.withLock { () -> Bool in
            defer { stopped = true }
            return !stopped
        }
        guard first else { return }
        done.wait()
        socket.close()
        unlink(path)
    }
}
