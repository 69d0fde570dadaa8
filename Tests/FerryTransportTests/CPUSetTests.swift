import CFerryLinux
import FerryIO
import Foundation
import Testing

struct CPUSetTests {
    @Test("--cpus lists parse: cores and ranges, each core once, only cores that exist")
    func parsing() throws {
        #expect(try CPUSet(parsing: "0").cores == [0])
        #expect(try CPUSet(parsing: "0-1").cores == [0, 1])
        #expect(try CPUSet(parsing: "1,0").cores == [1, 0])
        for bad in ["", "a", "1-0", "0,0", "0-", "-1", "0--1", "99999", "0,,1"] {
            #expect(throws: CPUSetError.self, "\(bad)") { try CPUSet(parsing: bad) }
        }
        let online = ProcessInfo.processInfo.activeProcessorCount
        let error = try #require(throws: CPUSetError.self) { try CPUSet(parsing: "\(online)") }
        #expect(error.description.contains("does not exist"))
    }

    @Test("the default leaves QEMU three quarters of a large host and pins nothing on a small one")
    func automatic() {
        #expect(CPUSet.automatic(onlineCores: 2) == nil)
        #expect(CPUSet.automatic(onlineCores: 4)?.cores == [2, 3])
        #expect(CPUSet.automatic(onlineCores: 16)?.cores == [12, 13, 14, 15])
        #expect(CPUSet.automatic(onlineCores: 16)?.description == "12-15")
        #expect(CPUSet(cores: [0, 2, 3, 4, 7]).description == "0,2-4,7")
        #expect(CPUSet(cores: [4, 5]).core(for: 3) == 5)
    }

    @Test("a pinned thread runs on its one core")
    func pinning() throws {
        let set = try CPUSet(parsing: "0-\(ProcessInfo.processInfo.activeProcessorCount - 1)")
        let result = Locked<(Bool, Int32)>((false, 0))
        let thread = Thread {
            let ok = set.pinCurrentThread(index: 1)
            result.withLock { $0 = (ok, ferry_allowed_cpus()) }
        }
        thread.start()
        let deadline = Date().addingTimeInterval(5)
        while !result.current.0 && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        #expect(result.current.0)
        #expect(result.current.1 == 1)
    }
}
