import ExpertParallel
import ExpertParallelGPU
import Foundation
import Synchronization
import Testing

/// Reproductions of an open defect, not yet passing tests: groups launching their ranks
/// separately (`.perRank`) beside other work of the process. What is known (H200, 2026-12-02/03):
/// - A thread calling `cuMemFree` in a loop beside a group stepping per rank costs the group a
///   timeout on 12 of 12 steps (a rank's kernel is held back while its peers spin); allocations,
///   synchronous memsets and event creation beside cost nothing. With this library's allocations
///   and frees taking turns with the per-rank launch loops (LaunchGate, tried behind a switch),
///   the same 12 steps took 5.2 ms in all.
/// - Two groups stepping per rank at once (40 steps each, warm or cold) finish every step with no
///   timeout and every rank active.
/// - Both tests below nevertheless ran past 25 s in builds with frees, or allocations and frees,
///   gated: traced by stage, the steps and their status checks finished, then the test thread
///   stopped in the checks after them (two groups: after all 80 steps; frees beside: step 0's),
///   no thread holding the gate. Found afterwards (no GPU left that session): a failing
///   `#expect(a == b)` on byte arrays makes Swift Testing diff them, in time quadratic in their
///   length (80,000 bytes: 22 s; a rank's 800 KB receive buffer: most of an hour), and
///   `expectMatch` compared whole buffers that way. So these results did not match the oracle;
///   `expectMatch` now reports the first differing byte at once (`expectSameBytes`). Why they
///   differ (a defect of repeated per-rank steps, or of these tests) is the next thing to find.
/// Enable with EP_GPU_TESTS=1 EP_REPRODUCE_CONCURRENT_PER_RANK=1.
@Suite(.enabled(if: gpuTestsEnabled && sharedDevice != nil && ProcessInfo.processInfo.environment["EP_REPRODUCE_CONCURRENT_PER_RANK"] == "1",
                "reproduces an open defect: set EP_GPU_TESTS=1 EP_REPRODUCE_CONCURRENT_PER_RANK=1"), .serialized)
struct ConcurrentPerRankGroupsTests {
    static let tokens = [16, 9, 16, 4]

    /// LL, 4 ranks, small rows: each step is launch-bound, so a stall shows as a timeout.
    static func config(hidden: Int, timeout: Duration) -> GroupConfig {
        GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 32, topK: 4, hidden: hidden, elementType: .bf16,
                    maxTokensPerRank: 16, timeout: timeout)
    }

    /// Both groups finish every step well inside the timeout, match the oracle, masks intact.
    @Test func twoGroupsLaunchingPerRankDoNotWaitForEachOther() throws {
        let device = try #require(sharedDevice)
        let config = Self.config(hidden: 256, timeout: .seconds(3)), tokens = Self.tokens
        let inputs = StepInputs(config: config, tokens: tokens, seed: 21)
        let groups = try (0..<2).map { _ in try VirtualGPUGroup(config, device: device) }
        let buffers = try (0..<2).map { _ in try GPUStep(config, device, tokens: tokens) }
        for b in buffers { try b.upload(inputs) }
        // One step each first: the kernels' compile is not what the timing below measures.
        for i in 0..<2 { try buffers[i].enqueue(groups[i], mode: .perRank) }
        for group in groups { try group.checkStatus() }
        let failures = Mutex<[String]>([])
        let start = ContinuousClock.now
        DispatchQueue.concurrentPerform(iterations: 2) { i in
            do {
                for _ in 0..<40 { try buffers[i].enqueue(groups[i], mode: .perRank) }
                try groups[i].checkStatus()
            } catch {
                failures.withLock { $0.append("group \(i): \(error)") }
            }
        }
        #expect(failures.withLock { $0 } == [])
        #expect(ContinuousClock.now - start < .seconds(3), "80 steps took longer than one timeout")
        let oracle = try oracleStep(config, inputs)
        for (i, group) in groups.enumerated() {
            #expect(try group.activeRanks == .all(4))
            expectMatch(try buffers[i].results(group), oracle, "group \(i)")
        }
    }

    /// One group steps per rank while another thread allocates and frees device memory: no step
    /// waits out the timeout, no rank is lost, every step matches the oracle.
    @Test func freesBesideDoNotStallPerRankLaunches() throws {
        let device = try #require(sharedDevice)
        let config = Self.config(hidden: 768, timeout: .seconds(1)), tokens = Self.tokens
        let inputs = StepInputs(config: config, tokens: tokens, seed: 22)
        let group = try VirtualGPUGroup(config, device: device)
        let step = try GPUStep(config, device, tokens: tokens)
        try step.upload(inputs)
        try step.enqueue(group, mode: .perRank)
        try group.checkStatus()
        let oracle = try oracleStep(config, inputs)
        let stop = Mutex(false), frees = Mutex(0)
        let allocator = Thread {
            while !stop.withLock({ $0 }) {
                if (try? DeviceTensor(.u8, [1 << 20], on: device)) != nil { frees.withLock { $0 += 1 } }
            }
        }
        allocator.start()
        defer { stop.withLock { $0 = true } }
        let start = ContinuousClock.now
        for s in 0..<12 {
            try step.enqueue(group, mode: .perRank)
            try group.checkStatus()
            #expect(try group.activeRanks == .all(4), "step \(s)")
            expectMatch(try step.results(group), oracle, "step \(s) beside frees")
        }
        #expect(ContinuousClock.now - start < .seconds(1), "12 steps took longer than one timeout")
        #expect(frees.withLock { $0 } > 0, "the other thread freed nothing while the steps ran")
    }
}
