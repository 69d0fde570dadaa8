/// Errors of VM management: which VM, what was being done, why.
public enum VMError: Error, CustomStringConvertible, Sendable {
    case badInput(String)
    case notFound(String)
    case exists(String)
    case busy(String)
    case qemu(String)
    case io(String)
    /// The host's memory directory cannot hold the VM's RAM.
    case noMemoryRoom(MemoryShortfall)
    /// The VM's files are damaged (which, and why): `ferry vm repair` or `ferry vm stop`.
    case damaged(String, String)

    public var description: String {
        switch self {
        case .badInput(let s), .qemu(let s), .io(let s), .busy(let s): return s
        case .notFound(let name): return "no VM named '\(name)' on this host"
        case .exists(let name): return "a VM named '\(name)' already exists on this host"
        case .noMemoryRoom(let shortfall): return shortfall.description
        case .damaged(let name, let why):
            return "VM '\(name)' is damaged: \(why); `ferry vm repair \(name)` adopts its QEMU again, `ferry vm stop \(name)` stops it"
        }
    }
}
