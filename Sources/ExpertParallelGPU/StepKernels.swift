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

    init(device: GPUDevice, config: GroupConfig, variant: Variant, tuning: GPUTuning) throws(EPError) {
        let prefix = config.algorithm == .lowLatency ? "ep_ll" : "ep_ht"
        var defines = Self.defines(config, variant, tuning)
        defines.merge(try KernelDefineOverrides.fromEnvironment(reserved: Set(defines.keys))) { old, _ in old }
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
