import ExpertParallel
import ExpertParallelGPU
import Foundation
import Synchronization
import Testing

/// Two virtual groups on one GPU, each launching its ranks separately (`.perRank`) from a thread
/// of its own. Before `LaunchGate` (StepKernels.swift) this failed 6 of 6 runs on an H100: about
/// 3 s (one timeout) for 80 steps and a group that lost ranks 1–3 from its mask. The cause:
/// lazy loading let one group's first launch of a kernel (or its module load) wait for the whole
/// context between another group's per-rank launches, whose launched ranks then spun until the
/// timeout. Functions are now loaded eagerly, and module loads and a call's per-rank launches
/// take turns.
@Suite(.enabled(if: gpuTestsEnabled, "needs a GPU (EP_GPU_TESTS=1)"))
struct ConcurrentPerRankGroupsTests {
    /// Both groups finish every step well inside the timeout, match the oracle, masks intact.
    @Test func twoGroupsLaunchingPerRankDoNotWaitForEachOther() throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 32, topK: 4, hidden: 256, elementType: .bf16,
                                 maxTokensPerRank: 16, timeout: .seconds(3))
        let tokens = [16, 9, 16, 4]
        let inputs = StepInputs(config: config, tokens: tokens, seed: 21)
        let groups = try (0..<2).map { _ in try VirtualGPUGroup(config, device: device) }
        let buffers = try (0..<2).map { _ in try GPUStep(config, device, tokens: tokens) }
        for b in buffers { try b.upload(inputs) }
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
}
