import Foundation
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelKernels

/// The update, dispatch and combine kernels of one specialisation: ep_ll.cu or ep_ht.cu
/// compiled with the group's shape as -D constants.
struct StepKernels: Sendable {
    let module: CUDAModule
    let update: CUDAFunction
    let dispatch: CUDAFunction
    let combine: CUDAFunction
    /// Copies the rows a step received from a caller's tensor into the buffer the peers read
    /// (an NCCL rank's combine from the caller's expert outputs).
    let copyReceived: CUDAFunction
    /// The staged transport's drain (after dispatch) and combine-send (before combine).
    let drain: CUDAFunction?
    let combineSend: CUDAFunction?
    /// LL, direct transport, where its shared memory fits: update and dispatch in one launch.
    let updateDispatch: CUDAFunction?
    /// Whether updateDispatch's dispatch blocks find their rows themselves (EP_LL_OWN in ep_ll.cu,
    /// not turned off by EP_LL_OWN_ROWS=0): its update block then takes the last share of the
    /// items, which a launch of one block more than they need leaves empty.
    let findsOwnRows: Bool

    /// What a specialisation depends on besides the group configuration.
    struct Variant: Hashable, Sendable {
        var indexBytes: Int
        var receivedIndexBytes: Int
        var vectorBytes: Int
        var transport: GPUTransport = .direct
        /// Every rank on one GPU (virtual ranks): flags between ranks need gpu scope only, not sys;
        /// and every rank's routing is in the launch (the fused kernel's own rows).
        var oneDevice = false
        /// LL dispatch quantising to FP8: chunks of a row (512 elements) a lane loads before it
        /// looks up the row's destinations (EP_FP8_AHEAD; `fp8ChunksAhead(_:_:blocks:)`). Set by
        /// the engine; 2 elsewhere.
        var fp8ChunksAhead = 2

        /// The group words and handle layout these kernels are compiled against.
        func workspace(_ config: GroupConfig, _ tuning: GPUTuning) -> StepWorkspace {
            StepWorkspace(config, transport: transport, updateChunkTokens: tuning.updateChunkTokens, everyRankHere: oneDevice)
        }
    }

    static func defines(_ config: GroupConfig, _ variant: Variant, _ tuning: GPUTuning) -> [String: String] {
        let element = switch config.elementType {
        case .bf16: 0
        case .f16: 1
        case .f32: 2
        default: 3
        }
        var defines = tuning.defines.merging([
            "EP_R": "\(config.ranks)", "EP_L": "\(config.localExperts)", "EP_K": "\(config.topK)",
            "EP_BMAX": "\(config.maxTokensPerRank)", "EP_ROW_BYTES": "\(config.rowBytes)", "EP_ELEM": "\(element)",
            "EP_IDX_BYTES": "\(variant.indexBytes)", "EP_RIDX_BYTES": "\(variant.receivedIndexBytes)",
            "EP_VEC_BYTES": "\(variant.vectorBytes)", "EP_TRANSPORT": variant.transport == .staged ? "1" : "0",
            "EP_ONE_DEVICE": variant.oneDevice ? "1" : "0", "EP_HT": config.algorithm == .highThroughput ? "1" : "0",
        ]) { _, new in new }
        defines.merge(StepArguments.contractDefines(ranks: config.ranks)) { _, new in new }
        defines.merge(variant.workspace(config, tuning).defines) { _, new in new }
        if variant.transport == .staged { defines["EP_HOST_ORIGIN_INDEX_BITS"] = "\(StepStaging.originIndexBits)" }
        if let fp8 = config.fp8 {
            // FP8 groups only: every other variant keeps its defines (and its cache key) unchanged.
            defines["EP_FP8"] = fp8.source == .quantize ? "1" : "2"
            defines["EP_FP8_BLOCK"] = "\(fp8.scales.blockSize)"
            defines["EP_FP8_POW2"] = fp8.scales.isPowerOfTwo ? "1" : "0"
            defines["EP_HOST_SCALE_WORDS"] = "\(config.fp8Format?.scaleWordsPerRow ?? 0)"
            if loadsFP8Ahead(config) { defines["EP_FP8_AHEAD"] = "\(variant.fp8ChunksAhead)" }
        }
        switch config.algorithm {
        case .lowLatency:
            defines["EP_RANK_MAJOR"] = config.layout == .rankMajor ? "1" : "0"
        case .highThroughput:
            defines["EP_EXPERT_MAJOR"] = config.isExpertMajorHT ? "1" : "0"
            defines["EP_ALIGN"] = "\(config.alignment)"
            defines["EP_CAPACITY"] = "\(config.receiveCapacity)"
            defines["EP_DROP"] = config.overflow == .drop ? "1" : "0"
        }
        return defines
    }

    /// Defines the host chooses that `EP_KERNEL_DEFINES` may still replace, to try another value.
    static let overridable: Set<String> = ["EP_FP8_AHEAD"]

    /// `defines(_:_:_:)` with the switches of `overrides` (`EP_KERNEL_DEFINES`'s text) added: those
    /// the group does not set, and those of `overridable` in place of the host's choice.
    static func defines(_ config: GroupConfig, _ variant: Variant, _ tuning: GPUTuning, overrides: String?) throws(EPError) -> [String: String] {
        var defines = Self.defines(config, variant, tuning)
        let reserved = Set(defines.keys).subtracting(overridable)
        defines.merge(try KernelDefineOverrides.parse(overrides, reserved: reserved)) { _, tried in tried }
        return defines
    }

    /// Whether `config`'s dispatch loads FP8 chunks ahead of its row lookups, and so reads
    /// EP_FP8_AHEAD: LL quantising bf16 or f16 rows (EP_AHEAD_FITS in ep_wire.cuh; HT loads nothing
    /// ahead, nor does an f32 row, whose chunks would spill there).
    static func loadsFP8Ahead(_ config: GroupConfig) -> Bool {
        config.algorithm == .lowLatency && config.elementType != .f32 && config.fp8?.source == .quantize
    }

    /// Chunks of 512 elements a lane of the LL dispatch loads ahead of its row lookups when it
    /// quantises bf16 or f16 rows to FP8: the chunks of a row piece, clamped to 2…4, as the
    /// dispatch cuts rows with `blocks` blocks a rank at the group's most tokens (`maxTokensPerRank`).
    /// A whole piece then costs one round trip to memory instead of two (the rest of a piece came
    /// from L2 after the first chunks' stores). An H100, FP8 ue8m0 ll-std at 8 virtual ranks (4
    /// pieces of 3–4 chunks): dispatch 30.1 → 28.6 µs with 4 chunks beside 2; with 14 pieces of one
    /// chunk (ll-std at one rank) 4 chunks at once read 8.42 against 8.06, so such pieces keep 2.
    /// It is chosen once per group: a step of fewer tokens, cut into more and smaller pieces, runs
    /// the same kernel (loading only its piece), and pays for the larger batch's registers: an
    /// H100, 16 and 48 tokens of a group of 128, dispatch 2–3 % slower than with 2 chunks ahead.
    /// f32 rows and HT load nothing ahead (EP_AHEAD_FITS; the HT dispatch copies whole rows): 2.
    static func fp8ChunksAhead(_ config: GroupConfig, _ tuning: GPUTuning, blocks: Int) -> Int {
        guard loadsFP8Ahead(config) else { return 2 }
        let pieces = StepArguments.rowPieces(tuning, blocks: blocks, tokens: config.maxTokensPerRank, rowBytes: config.wireRowBytes)
        let chunks = (config.hidden + 511) / 512
        return min(4, max(2, (chunks + pieces - 1) / pieces))
    }

    init(device: GPUDevice, config: GroupConfig, variant: Variant, tuning: GPUTuning) throws(EPError) {
        let prefix = config.algorithm == .lowLatency ? "ep_ll" : "ep_ht"
        let defines = try Self.defines(config, variant, tuning, overrides: Environment.value(KernelDefineOverrides.variable))
        let compiled = try gpu {
            try device.compiler.compile(KernelSource.embedded(prefix), arch: device.arch, defines: defines)
        }
        let driver = device.driver
        // The module load and each function's eager load take turns with other groups' per-rank
        // launch loops (LaunchGate, taken by the driver calls).
        let module = try gpu { try driver.loadModule(image: compiled.image) }
        self.module = module
        func function(_ name: String) throws(EPError) -> CUDAFunction {
            let f = try gpu { try driver.function(named: "\(prefix)_\(name)", in: module) }
            try gpu { try driver.load(f) }
            return f
        }
        update = try function("update")
        dispatch = try function("dispatch")
        combine = try function("combine")
        copyReceived = try function("copy_received")
        let staged = variant.transport == .staged
        drain = staged ? try function("drain") : nil
        combineSend = staged ? try function("combine_send") : nil
        let workspace = variant.workspace(config, tuning)
        updateDispatch = workspace.fused ? try function("update_dispatch") : nil
        findsOwnRows = workspace.ownRows && defines["EP_LL_OWN_ROWS"] != "0"
    }
}
