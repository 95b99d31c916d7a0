import CExpertParallel
import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelC
@testable import ExpertParallelGPU
import Testing

/// The device's routing errors name the rank whose routing it was, as the caller gave it: a
/// repeated expert as an out-of-range id does (`inputs[1].topkIdx`). Before, epGroupCheckStatus
/// said `inputs.topkIdx token 0 names expert 3 twice`, with no rank. Mock driver: the status
/// words are written where the kernels would write them.
struct DeviceStatusRankMockTests {
    static let config = GroupConfig(
        algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32, maxTokensPerRank: 2, layout: .expertMajor)

    /// Rank `rank`'s device status set to `words`, as a kernel that found its routing invalid leaves it.
    static func record(_ words: [UInt32], rank: Int, in group: VirtualGPUGroup) throws {
        let engine = group.engine
        try engine.device.driver.copy(words, to: engine.workspaces[rank].advanced(by: StepWorkspace.status * 4))
    }

    @Test func aRepeatedExpertOnTheDeviceNamesItsRank() throws {
        try MockCUDA.run { _ in
            let device = try MockCUDA.device()
            let gpu = try VirtualGPUGroup(Self.config, device: device)
            let twice: [UInt32] = [DeviceStatus.repeatedExpert.rawValue, 0, (0 << 16) | 1, 3]
            try Self.record(twice, rank: 1, in: gpu)
            #expect(throws: EPError.repeatedExpert(token: 0, firstColumn: 0, secondColumn: 1, expert: 3, rank: 1)) { try gpu.checkStatus() }
            let text = "token 0 names expert 3 twice (columns 0 and 1); each expert may appear once per token"
            // Through the C entry point, as the out-of-range case names its rank.
            let object = GroupObject(config: Self.config, backend: try GPUBackend(gpu))
            let group = groupRegistry.add(object)
            defer { _ = cGroupDestroy(group) }
            try Self.record(twice, rank: 1, in: gpu)
            #expect(cGroupCheckStatus(group) == epInvalidArgument)
            #expect(String(cString: cGetLastErrorMessage()) == "epGroupCheckStatus: invalid argument: inputs[1].topkIdx \(text)")
            try Self.record([DeviceStatus.indexRange.rawValue, 0, 1, 9], rank: 1, in: gpu)
            #expect(cGroupCheckStatus(group) == epInvalidArgument)
            #expect(String(cString: cGetLastErrorMessage()).hasPrefix("epGroupCheckStatus: invalid argument: inputs[1].topkIdx[0][1] = 9"))
            // An NCCL rank's status names its update's struct, with the rank as the out-of-range case does.
            let error = try #require(DeviceStatus.error(twice, rank: 1, config: Self.config))
            #expect(error.naming(.update).message == "invalid argument: inputs.topkIdx[rank 1] \(text)")
            // The host's routing check (one rank's own call) names no rank, as before.
            #expect(EPError.repeatedExpert(token: 0, firstColumn: 0, secondColumn: 1, expert: 3).naming(.update).message == "invalid argument: inputs.topkIdx \(text)")
        }
    }
}
