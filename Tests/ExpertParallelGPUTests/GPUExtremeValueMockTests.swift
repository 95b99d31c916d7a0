import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Testing

/// The GPU module's public helpers given extreme values (on the mock driver): named errors, not
/// traps or a stream held for centuries.
struct GPUExtremeValueMockTests {
    /// `validated(_:)` multiplied maxTokensPerRank by rowPieces for a configuration nobody had
    /// checked: Int.max × 2 trapped. The configuration is checked first now.
    @Test func tuningChecksItsConfigurationFirst() throws {
        let huge = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 64, maxTokensPerRank: .max)
        #expect(throws: EPError.invalidConfig(field: "maxTokensPerRank", value: "\(Int.max)", requirement: "must be ≤ 2147483647")) {
            try GPUTuning(rowPieces: 2).validated(huge)
        }
        var zero = huge
        zero.maxTokensPerRank = 4
        zero.ranks = 0
        #expect(throws: EPError.invalidConfig(field: "ranks", value: "0", requirement: "must be in 1...64")) { try GPUTuning().validated(zero) }
    }

    /// A delay of UInt64.max nanoseconds held the stream for 584 years: refused before anything
    /// is launched.
    @Test func aDelayPastTheBoundIsRefusedBeforeItLaunches() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let stream = try device.driver.createStream()
            for nanoseconds in [UInt64.max, GPUDevice.maxDelayNanoseconds + 1] {
                #expect(throws: EPError.invalidArgument(field: "nanoseconds", value: "\(nanoseconds)",
                                                        requirement: "must be ≤ 60000000000 (60 s): a delay holds the stream, longer would look like a hang")) {
                    try device.delay(stream, nanoseconds: nanoseconds)
                }
            }
            #expect(mock.launches == 0)
            try device.delay(stream, nanoseconds: 1_000)
            #expect(mock.launches == 1)
        }
    }

    /// The update took a routing view of -1 tokens (only the upper bound was checked) and
    /// converted the count to UInt64 for the kernel: a trap. Refused by name, nothing launched.
    @Test func aRoutingViewOfNegativeTokensIsRefusedByName() throws {
        try MockCUDA.run { mock in
            let config = CrossRankOverlapMockTests.config
            let device = try MockCUDA.device()
            let group = try VirtualGPUGroup(config, device: device)
            let t = try CrossRankOverlapMockTests.Tensors(config, device: device)
            let launches = mock.launches
            for tokens in [-1, Int.min] {
                var routing = t.idx[1].ref
                routing.shape = [tokens, config.topK]
                #expect(throws: EPError.invalidArgument(field: "topkIdx[rank 1].shape", value: "[\(tokens), 2]",
                                                        requirement: "must be [tokens in 0...maxTokensPerRank (2), topK = 2]")) {
                    try group.update(topkIdx: [t.idx[0].ref, routing])
                }
            }
            #expect(mock.launches == launches)
            try group.update(topkIdx: t.idx.map(\.ref))
        }
    }
}
