import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import ExpertParallelKernels
import Foundation
import Testing

/// Every kernel variant the library can ask for compiles, not only the defaults the GPU tests
/// happen to use: ep_ll and ep_ht (NVRTC, sm_90a, no GPU needed) over a pairwise covering set
/// of their `#if` dimensions. Each algorithm sees every value of EP_ELEM (bf16, f16, f32, u8),
/// EP_IDX_BYTES, EP_RIDX_BYTES and EP_VEC_BYTES (4/8, 4/8, 8/16), every layout (LL
/// EP_RANK_MAJOR 0/1, HT EP_EXPERT_MAJOR 0/1) with every element type, every pair of those
/// dimensions, HT's EP_DROP on and off under both layouts, the R = 1 flat combine path, and an
/// odd shape. `coversEveryDimension` checks that claim against the defines actually passed.
struct KernelVariantMatrixTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var config: GroupConfig
        var variant: StepKernels.Variant
        var testDescription: String {
            let c = config
            return "\(c.algorithm.rawValue) \(c.layout) \(c.elementType) R=\(c.ranks) E=\(c.experts) K=\(c.topK) H=\(c.hidden) "
                + "B=\(c.maxTokensPerRank)\(c.overflow == .drop ? " drop" : "") idx\(variant.indexBytes) ridx\(variant.receivedIndexBytes) "
                + "vec\(variant.vectorBytes) \(variant.transport)\(variant.oneDevice ? " virtual" : "")"
        }
    }

    /// The one place that turns a case into the library's -D set: if `StepKernels.defines`
    /// changes its signature, only this needs updating. With `EP_KERNEL_DEFINES` set, the matrix
    /// compiles that kernel variant (`EP_KERNEL_DEFINES=EP_HT_BULK=1 swift test --filter KernelVariantMatrix`).
    static func defines(_ c: Case) throws -> [String: String] {
        let config = try c.config.validated()
        return try StepKernels.defines(config, c.variant, try GPUTuning().validated(config),
                                       overrides: Environment.value(KernelDefineOverrides.variable))
    }

    static let elements: [DataType] = [.bf16, .f16, .f32, .u8]

    /// A hidden size whose row is a multiple of 16 bytes for 16-byte vectors, and 8 more than a
    /// multiple of 16 for 8-byte vectors (the row the library gives 8-byte vectors).
    static func hidden(_ element: DataType, vectorBytes: Int) -> Int {
        guard vectorBytes == 8 else { return 7168 }
        return switch element.byteSize {
        case 1: 7176
        case 2: 7172
        default: 7170
        }
    }

    /// Two-level factors (index bytes, received index bytes, vector bytes, drop) of the element
    /// type at the same position in `elements`, under the first layout; the second layout gets the
    /// complements. The columns 0011, 0101, 0110, 0001 are neither constant, equal nor complementary,
    /// so with the complements every pair of factors (the layout among them) takes all four value
    /// pairs, and every element type meets both values of every factor and both layouts.
    static let bits: [(idx: Bool, ridx: Bool, vec: Bool, drop: Bool)] = [
        (false, false, false, false),
        (false, true, true, false),
        (true, false, true, false),
        (true, true, false, true),
    ]

    static func pairwise(_ algorithm: Algorithm) -> [Case] {
        let layouts: [Layout] = algorithm == .lowLatency ? [.expertMajor, .rankMajor] : [.flat, .expertMajorPadded(alignment: 128)]
        var cases: [Case] = []
        for (second, layout) in layouts.enumerated() {
            for (element, b) in zip(elements, bits) {
                let flip = second == 1
                let variant = StepKernels.Variant(
                    indexBytes: b.idx != flip ? 8 : 4, receivedIndexBytes: b.ridx != flip ? 8 : 4, vectorBytes: b.vec != flip ? 8 : 16)
                let drop = algorithm == .highThroughput && b.drop != flip
                let config = GroupConfig(
                    algorithm: algorithm, ranks: 8, experts: 256, topK: 8, hidden: hidden(element, vectorBytes: variant.vectorBytes),
                    elementType: element, maxTokensPerRank: algorithm == .lowLatency ? 128 : 4096,
                    maxReceivedTokensPerRank: drop ? 8192 : nil, layout: layout, overflow: drop ? .drop : .fail)
                cases.append(Case(config: config, variant: variant))
            }
        }
        return cases
    }

    /// R = 1 (HT flat's single-row combine path, compiled only there; expert-major and LL at
    /// R = 1 for contrast), an odd shape under every layout, and LL's update counting per warp
    /// (bitmaps too large) with the fused update + dispatch kernel and without it.
    static let special: [Case] = [
        Case(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 128, topK: 4, hidden: 2048, maxTokensPerRank: 1024),
             variant: .init(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16)),
        Case(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 1024, topK: 8, hidden: 2048, maxTokensPerRank: 320,
                                 layout: .rankMajor),
             variant: .init(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: 16)),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 1, experts: 32, topK: 8, hidden: 7168, maxTokensPerRank: 4096),
             variant: .init(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16)),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 1, experts: 32, topK: 4, hidden: 7170, elementType: .f32,
                                 maxTokensPerRank: 512, maxReceivedTokensPerRank: 256, overflow: .drop),
             variant: .init(indexBytes: 4, receivedIndexBytes: 8, vectorBytes: 8)),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 1, experts: 32, topK: 8, hidden: 4096, elementType: .f16,
                                 maxTokensPerRank: 1024, layout: .expertMajorPadded(alignment: 16)),
             variant: .init(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16)),
        Case(config: GroupConfig(algorithm: .lowLatency, ranks: 1, experts: 16, topK: 4, hidden: 4096, maxTokensPerRank: 64),
             variant: .init(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: 16)),
        Case(config: GroupConfig(algorithm: .lowLatency, ranks: 6, experts: 96, topK: 10, hidden: 2880, elementType: .f16,
                                 maxTokensPerRank: 77, layout: .rankMajor),
             variant: .init(indexBytes: 8, receivedIndexBytes: 8, vectorBytes: 8)),
        Case(config: GroupConfig(algorithm: .lowLatency, ranks: 6, experts: 96, topK: 10, hidden: 2880, elementType: .u8,
                                 maxTokensPerRank: 77, layout: .expertMajor),
             variant: .init(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: 16)),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 6, experts: 96, topK: 10, hidden: 2880, elementType: .f32,
                                 maxTokensPerRank: 77, maxReceivedTokensPerRank: 300, layout: .flat, overflow: .drop),
             variant: .init(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16)),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 6, experts: 96, topK: 10, hidden: 2880,
                                 maxTokensPerRank: 77, layout: .expertMajorPadded(alignment: 3)),
             variant: .init(indexBytes: 4, receivedIndexBytes: 8, vectorBytes: 8)),
    ]

    /// The staged transport (EP_TRANSPORT 1, with its drain and combine-send kernels) under every
    /// layout, both index widths, both vector widths, drop, u8 and R = 1.
    static let staged: [Case] = [
        Case(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128),
             variant: .init(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: 16, transport: .staged)),
        Case(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 8, hidden: 7170, elementType: .f32,
                                 maxTokensPerRank: 128, layout: .rankMajor),
             variant: .init(indexBytes: 8, receivedIndexBytes: 8, vectorBytes: 8, transport: .staged)),
        Case(config: GroupConfig(algorithm: .lowLatency, ranks: 6, experts: 96, topK: 10, hidden: 2880, elementType: .u8,
                                 maxTokensPerRank: 77, layout: .expertMajor),
             variant: .init(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16, transport: .staged)),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 4096,
                                 maxReceivedTokensPerRank: 8192, overflow: .drop),
             variant: .init(indexBytes: 4, receivedIndexBytes: 8, vectorBytes: 16, transport: .staged)),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7172, elementType: .f16,
                                 maxTokensPerRank: 4096, layout: .expertMajorPadded(alignment: 128)),
             variant: .init(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 8, transport: .staged)),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 1, experts: 32, topK: 8, hidden: 7168, maxTokensPerRank: 4096),
             variant: .init(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16, transport: .staged)),
    ]

    /// FP8 dispatch (EP_FP8 1 quantise, 2 pass-through): every layout with both sources, every
    /// scale mode quantising from bf16, f16 and f32, both vector widths, the staged transport, R = 1,
    /// and hidden sizes that are not a multiple of the 512 elements a warp quantises at once.
    static let fp8: [Case] = {
        func config(_ layout: Layout, ranks: Int = 8, hidden: Int = 7168, _ element: DataType, _ mode: FP8ScaleMode,
                    _ source: FP8Dispatch.Source, drop: Bool = false) -> GroupConfig {
            let ll = layout == .expertMajor || layout == .rankMajor
            return GroupConfig(
                algorithm: ll ? .lowLatency : .highThroughput, ranks: ranks, experts: 32 * ranks, topK: 8, hidden: hidden, elementType: element,
                maxTokensPerRank: ll ? 128 : 4096, maxReceivedTokensPerRank: drop ? 8192 : nil, layout: layout,
                overflow: drop ? .drop : .fail, fp8: FP8Dispatch(scales: mode, source: source))
        }
        func variant(_ vec: Int, _ transport: GPUTransport = .direct) -> StepKernels.Variant {
            .init(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: vec, transport: transport)
        }
        let padded = Layout.expertMajorPadded(alignment: 128)
        return [
            Case(config: config(.expertMajor, .bf16, .float32Block128, .quantize), variant: variant(16)),
            Case(config: config(.expertMajor, hidden: 2816, .f16, .ue8m0Block128, .quantize), variant: variant(8)),
            Case(config: config(.expertMajor, .bf16, .e8m0Block32, .passThrough), variant: variant(16, .staged)),
            Case(config: config(.rankMajor, hidden: 96, .f32, .e8m0Block32, .quantize), variant: variant(16)),
            Case(config: config(.rankMajor, .bf16, .float32Block128, .passThrough), variant: variant(8)),
            Case(config: config(.rankMajor, .bf16, .ue8m0Block128, .quantize), variant: variant(16, .staged)),
            Case(config: config(.expertMajor, ranks: 1, .bf16, .ue8m0Block128, .quantize), variant: variant(16)),
            Case(config: config(.flat, .bf16, .ue8m0Block128, .quantize, drop: true), variant: variant(16)),
            Case(config: config(.flat, .bf16, .ue8m0Block128, .passThrough), variant: variant(16, .staged)),
            Case(config: config(.flat, ranks: 1, hidden: 2816, .f32, .float32Block128, .quantize), variant: variant(8)),
            Case(config: config(padded, .bf16, .e8m0Block32, .quantize), variant: variant(16)),
            Case(config: config(.expertMajorPadded(alignment: 3), .f16, .float32Block128, .passThrough), variant: variant(8)),
            Case(config: config(padded, .f16, .float32Block128, .quantize), variant: variant(16, .staged)),
        ]
    }()

    /// Virtual ranks, every rank on this GPU (EP_ONE_DEVICE 1: gpu-scope flags, the fused LL
    /// launch's blocks finding their own rows, and the bulk-copy paths where EP_KERNEL_DEFINES
    /// turns them on): both algorithms under every layout, both vector widths, drop, R = 1, and
    /// FP8 quantised and passed through. The cases above compile the kernels NCCL ranks run.
    static let virtual: [Case] = {
        func variant(_ vec: Int, idx: Int = 8) -> StepKernels.Variant {
            .init(indexBytes: idx, receivedIndexBytes: 4, vectorBytes: vec, oneDevice: true)
        }
        func fp8(_ mode: FP8ScaleMode, _ source: FP8Dispatch.Source) -> FP8Dispatch { FP8Dispatch(scales: mode, source: source) }
        return [
            Case(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128),
                 variant: variant(16)),
            Case(config: GroupConfig(algorithm: .lowLatency, ranks: 6, experts: 96, topK: 10, hidden: 2880, elementType: .f16,
                                     maxTokensPerRank: 77, layout: .rankMajor), variant: variant(8, idx: 4)),
            Case(config: GroupConfig(algorithm: .lowLatency, ranks: 1, experts: 32, topK: 8, hidden: 7168, maxTokensPerRank: 128),
                 variant: variant(16)),
            Case(config: GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 4096),
                 variant: variant(16)),
            Case(config: GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7170, elementType: .f32,
                                     maxTokensPerRank: 4096, maxReceivedTokensPerRank: 8192, layout: .expertMajorPadded(alignment: 128),
                                     overflow: .drop), variant: variant(8, idx: 4)),
            Case(config: GroupConfig(algorithm: .highThroughput, ranks: 1, experts: 32, topK: 8, hidden: 4096, maxTokensPerRank: 4096),
                 variant: variant(16)),
            Case(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128,
                                     fp8: fp8(.ue8m0Block128, .quantize)), variant: variant(16)),
            Case(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128,
                                     layout: .rankMajor, fp8: fp8(.e8m0Block32, .passThrough)), variant: variant(16)),
            Case(config: GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 4096,
                                     fp8: fp8(.float32Block128, .passThrough)), variant: variant(16)),
            Case(config: GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 4096,
                                     layout: .expertMajorPadded(alignment: 128), fp8: fp8(.ue8m0Block128, .quantize)), variant: variant(16)),
        ]
    }()

    static let cases = pairwise(.lowLatency) + pairwise(.highThroughput) + special + staged + fp8 + virtual

    @Test(.enabled(if: GPUTuningTests.runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"), arguments: cases)
    func compiles(_ c: Case) throws {
        let prefix = c.config.algorithm == .lowLatency ? "ep_ll" : "ep_ht"
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let compiled = try compiler.compile(
            KernelSource.embedded(prefix), arch: .hopper, defines: try Self.defines(c), extraOptions: ["--ptxas-options=-v"])
        #expect(compiled.format == .cubin)
        // u8 combine's body is compiled out, but the entry point is still there to be looked up.
        let entries = ["update", "dispatch", "combine"] + (c.variant.transport == .staged ? ["drain", "combine_send"] : [])
        for entry in entries.map({ "\(prefix)_\($0)" }) {
            #expect(compiled.log.contains("Compiling entry function '\(entry)'"), "ptxas did not report \(entry) (\(noReportHint)):\n\(compiled.log)")
            #expect(Self.contains(compiled.image, Array(entry.utf8) + [0]), "\(entry) is not in the CUBIN")
        }
    }

    /// The matrix covers what it claims, checked on the defines `StepKernels.defines` returns.
    @Test func coversEveryDimension() throws {
        for algorithm in [Algorithm.lowLatency, .highThroughput] {
            let all = try Self.cases.filter { $0.config.algorithm == algorithm }.map(Self.defines)
            let layout = algorithm == .lowLatency ? "EP_RANK_MAJOR" : "EP_EXPERT_MAJOR"
            let factors = [layout, "EP_ELEM", "EP_IDX_BYTES", "EP_RIDX_BYTES", "EP_VEC_BYTES"]
                + (algorithm == .highThroughput ? ["EP_DROP"] : [])
            let levels = ["EP_RANK_MAJOR": ["0", "1"], "EP_EXPERT_MAJOR": ["0", "1"], "EP_ELEM": ["0", "1", "2", "3"],
                          "EP_IDX_BYTES": ["4", "8"], "EP_RIDX_BYTES": ["4", "8"], "EP_VEC_BYTES": ["8", "16"], "EP_DROP": ["0", "1"]]
            for (i, a) in factors.enumerated() {
                #expect(Set(all.compactMap { $0[a] }) == Set(levels[a]!), "\(algorithm) \(a)")
                for b in factors[(i + 1)...] {
                    let seen = Set(all.compactMap { d in d[a].flatMap { x in d[b].map { "\(x),\($0)" } } })
                    let missing = levels[a]!.flatMap { x in levels[b]!.map { "\(x),\($0)" } }.filter { !seen.contains($0) }
                    #expect(missing.isEmpty, "\(algorithm): \(a),\(b) never takes \(missing)")
                }
            }
            if algorithm == .highThroughput {
                #expect(all.contains { $0["EP_R"] == "1" && $0["EP_EXPERT_MAJOR"] == "0" && $0["EP_ELEM"] != "3" }, "the R = 1 flat path")
            }
            #expect(all.contains { $0["EP_R"] == "6" && $0["EP_K"] == "10" }, "\(algorithm): an odd shape")
            let transports = Set(all.compactMap { d in d[layout].flatMap { l in d["EP_TRANSPORT"].map { "\(l),\($0)" } } })
            #expect(transports == ["0,0", "0,1", "1,0", "1,1"], "\(algorithm): every layout under both transports")
        }
    }

    /// The FP8 cases cover what `fp8` claims: both sources under every layout, every scale mode and
    /// every element type quantising, both vector widths, and the staged transport with both sources.
    @Test func fp8CoversEveryLayoutAndMode() throws {
        let all = try Self.fp8.map(Self.defines)
        for layout in ["EP_RANK_MAJOR", "EP_EXPERT_MAJOR"] {
            for value in ["0", "1"] {
                let sources = Set(all.filter { $0[layout] == value }.compactMap { $0["EP_FP8"] })
                #expect(sources == ["1", "2"], "\(layout)=\(value): FP8 sources \(sources)")
            }
        }
        let quantising = all.filter { $0["EP_FP8"] == "1" }
        #expect(Set(quantising.compactMap { d in d["EP_FP8_BLOCK"].flatMap { b in d["EP_FP8_POW2"].map { "\(b),\($0)" } } })
                == ["128,0", "128,1", "32,1"])
        #expect(Set(quantising.compactMap { $0["EP_ELEM"] }) == ["0", "1", "2"])
        #expect(Set(all.compactMap { $0["EP_VEC_BYTES"] }) == ["8", "16"])
        #expect(Set(all.filter { $0["EP_TRANSPORT"] == "1" }.compactMap { $0["EP_FP8"] }) == ["1", "2"])
        #expect(all.contains { Int($0["EP_ROW_BYTES"]!)! / 2 % 512 != 0 && $0["EP_FP8"] == "1" }, "a row that is not whole warp chunks")
    }

    static func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard let first = needle.first, haystack.count >= needle.count else { return false }
        var i = 0
        while i <= haystack.count - needle.count {
            if haystack[i] == first, haystack[i..<(i + needle.count)].elementsEqual(needle) { return true }
            i += 1
        }
        return false
    }
}
