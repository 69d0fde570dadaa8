#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CFerryLinux
import Foundation

/// Starts a named thread: the name is what `top -H`, `ps -L` and perf show for it (the
/// kernel keeps 15 characters), so an operator can see which channel or stream uses the CPU.
/// `core`: pin it to the core for that index in `cpus` (see ``CPUSet``), if `cpus` is given.
@discardableResult
public func startThread(_ name: String, cpus: CPUSet? = nil, core: Int? = nil, stackSize: Int = 1 << 20,
                        _ body: @escaping @Sendable () -> Void) -> Thread {
    let thread = Thread {
        ferry_name_thread(name)
        if let cpus, let core { cpus.pinCurrentThread(index: core) }
        body()
    }
    thread.name = name
    thread.stackSize = stackSize
    thread.start()
    return thread
}

/// The one thread that may use an object, checked in debug builds: the first ``check(_:)``
/// records the calling thread and every later one asserts that it comes from the same.
/// Release builds compile the check away (it is an `assert`); the record costs a word.
///
/// For state that one thread owns for good. State handed from thread to thread (a
/// connection's receive side, after its handshake) says so in its documentation instead.
public struct ThreadOwner: Sendable {
    @usableFromInline var owner: pthread_t?

    public init() {}

    /// Asserts (debug builds) that the calling thread owns `what`, claiming it on first use.
    @inlinable
    public mutating func check(_ what: @autoclosure () -> String, file: StaticString = #fileID, line: UInt = #line) {
        assert(claim(), "\(what()) used off its owner thread", file: file, line: line)
    }

    /// True if the calling thread is the owner, or now is (the first caller).
    @usableFromInline
    mutating func claim() -> Bool {
        let me = pthread_self()
        guard let owner else {
            owner = me
            return true
        }
        return pthread_equal(owner, me) != 0
    }
}

/// Moves the calling thread into the network namespace `name` (`ip netns`); sockets it
/// opens, and threads it starts, are in that namespace from then on. For the lab's tests.
public func enterNetworkNamespace(_ name: String) throws(SocketError) {
    guard ferry_enter_network_namespace("/var/run/netns/\(name)") == 0 else {
        throw SocketError("enter network namespace \(name) for", peer: name, kind: .system(errno))
    }
}
