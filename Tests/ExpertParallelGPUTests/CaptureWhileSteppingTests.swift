import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation
import Testing

/// A CUDA graph captured in global mode (PyTorch's default) on one thread, while another thread
/// steps another group and asks for its status, layout info and mask: the control path waits
/// for its own streams in relaxed capture mode, so neither the capture nor the steps fail, and
/// both match the oracle. A global capture makes every other thread's allocation fail
/// (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED), so this suite cannot run beside the others: it runs
/// alone, in a process of its own (`EP_CAPTURE_TESTS=1 tests --filter CaptureWhileStepping`,
/// which scripts/device-verify does after the suite).
@Suite(.enabled(if: gpuTestsEnabled && ProcessInfo.processInfo.environment["EP_CAPTURE_TESTS"] == "1",
                "runs alone: set EP_GPU_TESTS=1 EP_CAPTURE_TESTS=1 and filter CaptureWhileStepping"), .serialized)
struct CaptureWhileSteppingTests {
    @Test func aGlobalCaptureSurvivesAnotherGroupsStatusCalls() async throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 16, topK: 4, hidden: 128, elementType: .bf16, maxTokensPerRank: 12)
        let tokens = [12, 7, 12, 3]
        let stepping = try VirtualGPUGroup(config, device: device)
        // The stepping thread allocates and uploads before the captures start: an allocation or a
        // synchronous copy of the caller's own is unsafe during another thread's global capture.
        let inputs = try StepInputs(config: config, tokens: tokens, seed: 900)
        let buffers = try GPUStep(config, device, tokens: tokens)
        try buffers.upload(inputs)
        try buffers.poison()   // rows no step writes keep the oracle's poison byte (every step writes the same rows)
        let done = Atomic(false)
        let other = Task.detached { () throws -> Int in
            var steps = 0
            while !done.load() || steps < 5 {
                try buffers.enqueue(stepping)                     // launches on its own stream
                _ = try stepping.activeRanks                      // the library's control path
                try stepping.checkStatus()
                _ = try stepping.layoutInfo(rank: 0)
                steps += 1
            }
            return steps
        }
        for round in 0..<5 {
            try graphReplaysMatchTheOracle(config, tokens: tokens, firstSeed: 1000 + UInt64(round) * 10, replays: 10, captureMode: .global) { _ in 0 }
        }
        done.store(true)
        let steps = try await other.value
        #expect(steps >= 5)
        expectMatch(try buffers.results(stepping), try oracleStep(config, inputs), "the stepping group's last step")
    }
}

/// A flag two threads share.
final class Atomic: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Bool
    init(_ value: Bool) { self.value = value }
    func load() -> Bool { lock.withLock { value } }
    func store(_ new: Bool) { lock.withLock { value = new } }
}
