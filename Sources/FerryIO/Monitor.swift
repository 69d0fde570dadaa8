#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One mutex with several condition variables: the state machines of the data path keep
/// their state under one lock but wake only the threads a change concerns.
///
/// `NSCondition` pairs every condition with its own mutex, so a value guarded by one lock
/// could only have one condition, and every change had to `broadcast` to every thread
/// waiting for anything: with 8 channel senders, a reader and a writer per stream, each
/// queued chunk and each acknowledgement woke about ten threads, nine for nothing. On the
/// 2-core lab host those wake-ups were the largest single cost of the source's CPU
/// (perf: ~40% of its samples in the scheduler's switch and wake-up paths).
/// Conditions wait on CLOCK_MONOTONIC, so deadlines survive wall-clock changes.
///
/// This is Ferry's one way to lock (docs/ARCHITECTURE.md, "Threads, not an event loop"):
/// a `Monitor` with its conditions, or ``Locked`` for a single value. Any thread.
// The mutex is the synchronisation; its pointer is immutable after init.
public final class Monitor: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    public func withLock<R>(_ body: () throws -> R) rethrows -> R {
        lock()
        defer { unlock() }
        return try body()
    }

    /// A new condition on this monitor's mutex.
    public func makeCondition() -> Condition { Condition(mutex: mutex, owner: self) }

    /// A condition variable bound to its monitor's mutex; wait only with the lock held.
    // pthread_cond is the synchronisation; its pointers are immutable after init.
    public final class Condition: @unchecked Sendable {
        private let cond: UnsafeMutablePointer<pthread_cond_t>
        private let mutex: UnsafeMutablePointer<pthread_mutex_t>
        /// Keeps the mutex alive as long as a condition on it is.
        private let owner: Monitor

        fileprivate init(mutex: UnsafeMutablePointer<pthread_mutex_t>, owner: Monitor) {
            self.mutex = mutex
            self.owner = owner
            cond = .allocate(capacity: 1)
            var attributes = pthread_condattr_t()
            pthread_condattr_init(&attributes)
            pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
            pthread_cond_init(cond, &attributes)
            pthread_condattr_destroy(&attributes)
        }

        deinit {
            pthread_cond_destroy(cond)
            cond.deallocate()
        }

        /// Waits for a signal (lock held; released while waiting).
        public func wait() { pthread_cond_wait(cond, mutex) }

        /// Waits for a signal or `timeout`; false if the time ran out.
        @discardableResult
        public func wait(timeout: Duration) -> Bool {
            var now = timespec()
            clock_gettime(CLOCK_MONOTONIC, &now)
            let (seconds, attoseconds) = max(timeout, .zero).components
            var nanos = Int(now.tv_nsec) + Int(attoseconds / 1_000_000_000)
            var deadline = timespec(tv_sec: now.tv_sec + Int(seconds) + nanos / 1_000_000_000, tv_nsec: 0)
            nanos %= 1_000_000_000
            deadline.tv_nsec = nanos
            return pthread_cond_timedwait(cond, mutex, &deadline) != ETIMEDOUT
        }

        /// Waits until `deadline` at the latest; false if it passed.
        @discardableResult
        public func wait(until deadline: ContinuousClock.Instant) -> Bool {
            wait(timeout: deadline - .now)
        }

        /// Wakes one waiter.
        public func signal() { pthread_cond_signal(cond) }
        /// Wakes every waiter.
        public func broadcast() { pthread_cond_broadcast(cond) }
    }
}

/// A value that any thread may read or change, one at a time: a ``Monitor`` around it, for
/// state that needs no condition (counters, a result handed from one thread to another).
public final class Locked<Value> {
    private let monitor = Monitor()
    private var value: Value
    public init(_ value: Value) { self.value = value }
    public func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        monitor.lock()
        defer { monitor.unlock() }
        return try body(&value)
    }
    public var current: Value { withLock { $0 } }
}

// `value` is only reached inside `withLock`, under `monitor`; it must be Sendable itself
// because `current` and `withLock` hand copies of it to the calling thread.
extension Locked: @unchecked Sendable where Value: Sendable {}
