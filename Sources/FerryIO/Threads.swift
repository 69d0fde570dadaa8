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
