import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Testing

/// Inputs the GPU backend must refuse before any kernel sees them, and shapes at its bounds.
/// Gated on EP_GPU_TESTS=1 (a GPU group needs a device).
@Suite(.enabled(if: gpuTestsEnabled, "needs a GPU: set EP_GPU_TESTS=1"), .serialized)
struct GPUValidationTests {
    /// More local experts than the update kernel has threads: every expert's counter is written.
    @Test(arguments: [Layout.expertMajor, .expertMajorPadded(alignment: 128)])
    func moreLocalExpertsThanUpdateThreadsMatchTheOracle(layout: Layout) throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig.forLayout(layout, ranks: 1, experts: 600, topK: 8, hidden: 16, elementType: .bf16, maxTokensPerRank: 8)
        let group = try VirtualGPUGroup(config, device: device)
        let inputs = try StepInputs(config: config, tokens: [8], seed: 4, minusOneRate: 0)
        try stepMatchesTheOracle(group, inputs, [8], "\(layout) with 600 local experts")
    }

    @Test func receivedIdsOfDifferentWidthsAreRefused() throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .bf16, maxTokensPerRank: 4)
        let group = try VirtualGPUGroup(config, device: device)
        let buffers = try GPUStep(config, device, tokens: [4, 4])
        try buffers.upload(StepInputs(config: config, tokens: [4, 4], seed: 1))
        try group.update(topkIdx: buffers.idx.map(\.ref))
        let wide = try DeviceTensor(.i64, config.receiveRoutingShape!, on: device)
        let outputs = [DispatchOutput(tokens: buffers.received[0].ref, topkIdx: buffers.receivedIdx[0]!.ref, topkWeights: buffers.receivedWeights[0]!.ref),
                       DispatchOutput(tokens: buffers.received[1].ref, topkIdx: wide.ref, topkWeights: buffers.receivedWeights[1]!.ref)]
        #expect(throws: EPError.invalidArgument(field: "outputs[1].topkIdx.dtype", value: "i64", requirement: "must match rank 0's (i32)")) {
            try group.dispatch((0..<2).map { DispatchInput(tokens: buffers.x[$0].ref, topkWeights: buffers.w[$0].ref) }, into: outputs)
        }
    }

    @Test func misalignedRowsAreRefused() throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 1, experts: 4, topK: 2, hidden: 8, elementType: .bf16, maxTokensPerRank: 4)
        let group = try VirtualGPUGroup(config, device: device)
        let buffers = try GPUStep(config, device, tokens: [3])
        try buffers.upload(StepInputs(config: config, tokens: [3], seed: 2))
        try group.update(topkIdx: buffers.idx.map(\.ref))
        let big = try DeviceTensor(.bf16, [4, 8], on: device)
        var shifted = big.ref
        shifted.address = shifted.address! + 2
        shifted.shape = [3, 8]
        #expect(throws: EPError.self) {
            try group.dispatch([DispatchInput(tokens: shifted)], into: [DispatchOutput(tokens: buffers.received[0].ref)])
        }
    }
}
