import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import ExpertParallelKernels
import Testing

/// The Swift/CUDA contract has one source of truth on each side and NVRTC checks that they
/// agree (no GPU needed): the host passes every argument field's offset, the workspace and handle
/// words and the block sizes as -D defines, and the kernels `static_assert` their own layout
/// against them. A host that writes a field elsewhere does not compile.
@Suite(.enabled(if: GPUTuningTests.runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"))
struct ArgumentContractTests {
    static let config = GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 16, topK: 3, hidden: 64, maxTokensPerRank: 8)

    struct Mismatch: CustomTestStringConvertible, Sendable {
        var define: String
        var value: String
        var message: String
        var testDescription: String { "\(define)=\(value)" }
    }

    static let mismatches: [Mismatch] = [
        Mismatch(define: "EP_OFF_RANK_HANDLE", value: "80", message: "EpRankArgs.handle is not at the offset the host writes"),
        Mismatch(define: "EP_OFF_RANK_X", value: "8", message: "EpRankArgs.x is not at the offset the host writes"),
        Mismatch(define: "EP_OFF_SLICES", value: "0", message: "EpArgs.slices is not at the offset the host writes"),
        Mismatch(define: "EP_ARGS_BYTES", value: "8", message: "EpArgs size differs from the host's"),
        Mismatch(define: "EP_HOST_WS_COUNTS", value: "11", message: "WS_COUNTS differs from the host's"),
        Mismatch(define: "EP_HOST_H_LAYOUT", value: "3", message: "LL H_LAYOUT differs from the host's"),
        Mismatch(define: "EP_HOST_THREADS", value: "256", message: "dispatch/combine threads per block differ from the host's"),
        Mismatch(define: "EP_HOST_UPDATE_THREADS", value: "128", message: "LL update threads differ from the host's"),
        Mismatch(define: "EP_HOST_H_COMMON", value: "2", message: "H_COMMON differs from the host's"),
    ]

    func compile(_ config: GroupConfig, _ change: [String: String] = [:]) throws -> CompiledKernel {
        let config = try config.validated()
        var defines = StepKernels.defines(config, .init(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: 16), try GPUTuning().validated(config))
        defines.merge(change) { _, new in new }
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        return try compiler.compile(KernelSource.embedded(config.algorithm == .lowLatency ? "ep_ll" : "ep_ht"), arch: .hopper, defines: defines)
    }

    @Test func theHostsDefinesCarryEveryFieldOfTheContract() {
        let defines = StepKernels.defines(Self.config, .init(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: 16), GPUTuning())
        #expect(defines["EP_HOST_CONTRACT"] == "1")
        for field in RankField.allCases { #expect(defines["EP_OFF_RANK_\(field.macro)"] == "\(field.rawValue * 8)") }
        let launchBase = RankField.allCases.count * 8 * Self.config.ranks
        for field in LaunchField.allCases { #expect(defines["EP_OFF_\(field.macro)"] == "\(launchBase + field.rawValue * 8)") }
    }

    /// The kernels learn their algorithm from EP_HT (HT loads rows through L2 only, LL through the
    /// read-only path: EP_ROW_LOADS in ep_step.cuh).
    @Test func theHostsDefinesNameTheAlgorithm() {
        var ht = Self.config
        ht.algorithm = .highThroughput
        ht.layout = .flat
        let variant = StepKernels.Variant(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: 16)
        #expect(StepKernels.defines(Self.config, variant, GPUTuning())["EP_HT"] == "0")
        #expect(StepKernels.defines(ht, variant, GPUTuning())["EP_HT"] == "1")
    }

    @Test func bothAlgorithmsCompileWithTheHostsContract() throws {
        _ = try compile(Self.config)
        var ht = Self.config
        ht.algorithm = .highThroughput
        ht.layout = .expertMajorPadded(alignment: 2)
        _ = try compile(ht)
    }

    @Test(arguments: mismatches)
    func aMismatchFailsToCompileAndNamesTheField(_ mismatch: Mismatch) throws {
        #expect {
            _ = try compile(Self.config, [mismatch.define: mismatch.value])
        } throws: { error in
            guard case .nvrtc(_, _, _, let log)? = error as? CUDAError else { return false }
            return log.contains(mismatch.message)
        }
    }
}
