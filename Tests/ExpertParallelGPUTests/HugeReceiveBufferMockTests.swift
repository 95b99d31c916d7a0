import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// A GPU group sizes buffers from its configuration (an NCCL rank its receive and expert-output
/// rows, the staged transport its staging): receiveCapacity × hidden × element bytes, which the
/// core's bounds (each of them below 2^31) let pass Int.max. That multiplication trapped after the
/// device was set up; the GPU backend's own check now names it first. Over the mock driver (CI).
struct HugeReceiveBufferMockTests {
    /// HT flat, 2^31 − 1 receive rows of (2^31 − 2) float32: about 2^64 bytes.
    static let config = GroupConfig(
        algorithm: .highThroughput, ranks: 1, experts: 1, topK: 1, hidden: (1 << 31) - 2, elementType: .f32, maxTokensPerRank: 1,
        maxReceivedTokensPerRank: (1 << 31) - 1, layout: .flat)
    static let refusal = EPError.invalidConfig(
        field: "hidden", value: "2147483646",
        requirement: "with 2147483647 receive rows of 8589934584 bytes a rank's receive buffer is more than 2^62 bytes; the GPU backend allocates at most 2^62")

    @Test func theGPUChecksNameAReceiveBufferPastTwoToThe62() {
        #expect(throws: Self.refusal) { try Self.config.validatedForGPU() }
        // Just inside: at most 2^62 bytes of receive rows passes.
        var inside = Self.config
        inside.maxReceivedTokensPerRank = (1 << 62) / inside.rowBytes
        #expect(throws: Never.self) { try inside.validatedForGPU() }
    }

    /// A configuration the update's shared memory already refuses keeps that message (the
    /// buffer's check comes after it): LL with 2^30 tokens a rank names maxTokensPerRank, not hidden.
    @Test func theUpdatesSharedMemoryIsNamedFirst() {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 1, experts: 1, topK: 1, hidden: (1 << 31) - 2, elementType: .f32,
                                 maxTokensPerRank: 1 << 30)
        #expect {
            try config.validatedForGPU()
        } throws: { error in
            guard case let EPError.invalidConfig(field, _, requirement) = error else { return false }
            return field == "maxTokensPerRank" && requirement.contains("shared memory")
        }
    }

    @Test func anNCCLRankGroupOfSuchAConfigIsRefusedByName() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let nccl = try MockCUDA.nccl()
            let comm = NCCLComm(rawValue: OpaquePointer(bitPattern: 0xCC_0000)!)
            #expect(throws: Self.refusal) { try NCCLRankGroup(Self.config, device: device, comm: comm, nccl: nccl) }
            #expect(mock.deviceMemory.isEmpty && mock.ncclMemory.isEmpty && mock.streams.isEmpty)
        }
    }

    @Test func aStagedVirtualGroupOfSuchAConfigIsRefusedByName() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            #expect(throws: Self.refusal) { try VirtualGPUGroup(Self.config, device: device, transport: .staged) }
            #expect(mock.deviceMemory.isEmpty && mock.streams.isEmpty)
        }
    }
}
