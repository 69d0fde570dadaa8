import FerryIO
import Foundation
import Testing

@Suite("Process statistics")
struct ProcessStatsTests {
    @Test("the peak RSS starts again from the current size when reset, so a daemon reports one migration's peak")
    func peakRSSReset() throws {
        let before = try #require(ProcessStats.peakRSSBytes(pid: getpid()))
        // Touch 64 MiB more than the process ever held, then give it back.
        let size = Int(before) + (64 << 20)
        let block = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        memset(block, 1, size)
        block.deallocate()
        let raised = try #require(ProcessStats.peakRSSBytes(pid: getpid()))
        #expect(raised >= UInt64(size))
        #expect(ProcessStats.resetPeakRSS())
        let after = try #require(ProcessStats.peakRSSBytes(pid: getpid()))
        let current = try #require(ProcessStats.rssBytes(pid: getpid()))
        #expect(after < raised - (32 << 20))
        #expect(after >= current / 2)
    }
}
