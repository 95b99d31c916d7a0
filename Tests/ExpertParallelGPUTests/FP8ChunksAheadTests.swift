@testable import ExpertParallelGPU
import ExpertParallel
import Testing

/// The LL dispatch quantising to FP8 loads a whole piece of a row ahead of its row lookups where
/// the pieces are 3 or 4 chunks (8 virtual ranks of an H100 / H200), 2 chunks elsewhere;
/// EP_KERNEL_DEFINES may still try another value.
struct FP8ChunksAheadTests {
    static func config(ranks: Int = 8, element: DataType = .bf16, algorithm: Algorithm = .lowLatency,
                       source: FP8Dispatch.Source? = .quantize) throws -> GroupConfig {
        try GroupConfig(algorithm: algorithm, ranks: ranks, experts: 256, topK: 8, hidden: 7168, elementType: element,
                        maxTokensPerRank: algorithm == .lowLatency ? 128 : 4096, layout: algorithm == .lowLatency ? .expertMajor : .flat,
                        fp8: source.map { FP8Dispatch(scales: .ue8m0Block128, source: $0) }).validated()
    }

    /// 132 SMs give 33 blocks a rank at R = 8 (a row's 14 chunks in 4 pieces), 132 at R = 1 (14
    /// pieces of one chunk).
    @Test func theChunksAreAWholePieceBetweenTwoAndFour() throws {
        let tuning = GPUTuning()
        #expect(StepKernels.fp8ChunksAhead(try Self.config(), tuning, blocks: 33) == 4)
        #expect(StepKernels.fp8ChunksAhead(try Self.config(element: .f16), tuning, blocks: 33) == 4)
        #expect(StepKernels.fp8ChunksAhead(try Self.config(ranks: 1), tuning, blocks: 132) == 2)
        // An NCCL rank (its blocks fill the GPU): pieces of one chunk.
        #expect(StepKernels.fp8ChunksAhead(try Self.config(), tuning, blocks: 264) == 2)
        // Five pieces: 3 chunks each.
        #expect(StepKernels.fp8ChunksAhead(try Self.config(), GPUTuning(rowPieces: 5), blocks: 33) == 3)
        #expect(StepKernels.fp8ChunksAhead(try Self.config(), GPUTuning(rowPieces: 1), blocks: 33) == 4)
        #expect(StepKernels.fp8ChunksAhead(try Self.config(), GPUTuning(rowPieces: 14), blocks: 33) == 2)
        // f32 rows (16 registers a chunk a lane), HT, pass-through and unquantised rows keep 2.
        #expect(StepKernels.fp8ChunksAhead(try Self.config(element: .f32), tuning, blocks: 33) == 2)
        #expect(StepKernels.fp8ChunksAhead(try Self.config(algorithm: .highThroughput), tuning, blocks: 33) == 2)
        #expect(StepKernels.fp8ChunksAhead(try Self.config(source: .passThrough), tuning, blocks: 33) == 2)
        #expect(StepKernels.fp8ChunksAhead(try Self.config(source: nil), tuning, blocks: 33) == 2)
    }

    @Test func onlyTheKernelsThatLoadAheadTakeTheDefine() throws {
        var variant = StepKernels.Variant(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16, oneDevice: true)
        variant.fp8ChunksAhead = 4
        #expect(StepKernels.defines(try Self.config(), variant, GPUTuning())["EP_FP8_AHEAD"] == "4")
        #expect(StepKernels.defines(try Self.config(source: .passThrough), variant, GPUTuning())["EP_FP8_AHEAD"] == nil)
        #expect(StepKernels.defines(try Self.config(source: nil), variant, GPUTuning())["EP_FP8_AHEAD"] == nil)
        // f32 rows and HT load nothing ahead: the define would only split the kernel cache.
        #expect(StepKernels.defines(try Self.config(element: .f32), variant, GPUTuning())["EP_FP8_AHEAD"] == nil)
        #expect(StepKernels.defines(try Self.config(algorithm: .highThroughput), variant, GPUTuning())["EP_FP8_AHEAD"] == nil)
    }

    @Test func kernelDefinesMayTryAnotherValueButNotAShapeConstant() throws {
        var variant = StepKernels.Variant(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16, oneDevice: true)
        variant.fp8ChunksAhead = 4
        let config = try Self.config()
        let tried = try StepKernels.defines(config, variant, GPUTuning(), overrides: "EP_FP8_AHEAD=2,EP_DEST_GROUP=2")
        #expect(tried["EP_FP8_AHEAD"] == "2" && tried["EP_DEST_GROUP"] == "2")
        #expect(try StepKernels.defines(config, variant, GPUTuning(), overrides: nil) == StepKernels.defines(config, variant, GPUTuning()))
        // A name that is no switch stays refused through the same merge.
        #expect(throws: EPError.self) { try StepKernels.defines(config, variant, GPUTuning(), overrides: "EP_R=2") }
    }
}
