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
}
