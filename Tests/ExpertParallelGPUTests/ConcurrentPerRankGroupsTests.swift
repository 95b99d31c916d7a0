import ExpertParallel
import ExpertParallelGPU
import Foundation
import Synchronization
import Testing

/// Groups launching their ranks separately (`.perRank`) beside other work of the process: a
/// second group stepping per rank in another thread, and a thread that allocates and frees device
/// memory. Each step's ranks spin for each other on the GPU, so a free by another thread between a
/// call's launches held the last ranks back until the timeout: on an H200 (2026-12-02) that cost a
/// timeout on 12 of 12 steps, before this library's allocations and frees took turns with the
/// launch loops (LaunchGate.swift). History: these tests once looked hung after their steps; they
/// compared whole receive buffers with `#expect(a == b)`, whose failure diff is quadratic in the
/// length, and had not poisoned those buffers as the oracle does (`poison()`), so rows past the
/// counts differed (expectMatch now uses `expectSameBytes`). Per-rank steps need the process's GPU
/// to themselves otherwise (GPUOracle.swift): these run in the per-rank pass
/// (`EP_PER_RANK_TESTS=1`, scripts/device-verify).
@Suite(.enabled(if: gpuTestsEnabled && perRankTestsEnabled && sharedDevice != nil, "per-rank pass on a GPU: EP_GPU_TESTS=1 EP_PER_RANK_TESTS=1"),
       .serialized)
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
        let inputs = try StepInputs(config: config, tokens: tokens, seed: 21)
        let groups = try (0..<2).map { _ in try VirtualGPUGroup(config, device: device) }
        let buffers = try (0..<2).map { _ in try GPUStep(config, device, tokens: tokens) }
        for b in buffers {
            try b.upload(inputs)
            try b.poison()   // rows past the counts read as the oracle's do
        }
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

    /// One group steps per rank while another thread allocates and frees device memory (this
    /// library's tensors, whose allocations and frees take turns with the launch loops): no step
    /// waits out the timeout, no rank is lost, every step matches the oracle.
    @Test func freesBesideDoNotStallPerRankLaunches() throws {
        let device = try #require(sharedDevice)
        let config = Self.config(hidden: 768, timeout: .seconds(1)), tokens = Self.tokens
        let inputs = try StepInputs(config: config, tokens: tokens, seed: 22)
        let group = try VirtualGPUGroup(config, device: device)
        let step = try GPUStep(config, device, tokens: tokens)
        try step.upload(inputs)
        try step.poison()
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
        var stepping = Duration.zero   // the steps and their status checks, not the reads that check them
        for s in 0..<12 {
            let start = ContinuousClock.now
            try step.enqueue(group, mode: .perRank)
            try group.checkStatus()
            stepping += ContinuousClock.now - start
            #expect(try group.activeRanks == .all(4), "step \(s)")
            expectMatch(try step.results(group), oracle, "step \(s) beside frees")
        }
        #expect(stepping < .seconds(1), "12 steps took longer than one timeout")
        #expect(frees.withLock { $0 } > 0, "the other thread freed nothing while the steps ran")
    }
}
