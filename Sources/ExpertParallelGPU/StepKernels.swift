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
    /// The fused launch's cluster size (EP_LL_CLUSTER in ep_ll.cu, from `EP_KERNEL_DEFINES`): its
    /// dispatch blocks' prologue split across clusters of this many blocks of one rank, where they
    /// find their rows themselves, the split's shared memory fits and the device launches clusters
    /// (`GPUDevice.launchesClusters`); else 1, the define left out and the kernel the default's.
    let llCluster: Int
    /// How many clusters of `llCluster` blocks of the fused kernel can be resident at once (0
    /// where `llCluster` is 1).
    let maxActiveClusters: Int

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

    /// `overrides`: the switches to try (`KernelDefineOverrides`); nil: `EP_KERNEL_DEFINES`'s.
    init(device: GPUDevice, config: GroupConfig, variant: Variant, tuning: GPUTuning, overrides: [String: String]? = nil) throws(EPError) {
        let prefix = config.algorithm == .lowLatency ? "ep_ll" : "ep_ht"
        var defines = Self.defines(config, variant, tuning)
        let tried = if let overrides { overrides } else { try KernelDefineOverrides.fromEnvironment(reserved: Set(defines.keys)) }
        defines.merge(tried) { old, _ in old }
        let workspace = variant.workspace(config, tuning)
        let findsOwnRows = workspace.ownRows && defines["EP_LL_OWN_ROWS"] != "0"
        let cluster = Self.llClusterSize(requested: defines["EP_LL_CLUSTER"].flatMap { Int($0) } ?? 1, findsOwnRows: findsOwnRows,
                                         shareFits: config.llClusterShareFits, deviceLaunchesClusters: device.launchesClusters)
        if cluster == 1 { defines["EP_LL_CLUSTER"] = nil }
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
        updateDispatch = workspace.fused ? try function("update_dispatch") : nil
        self.findsOwnRows = findsOwnRows
        llCluster = cluster
        if cluster > 1, let fused = updateDispatch {
            maxActiveClusters = try gpu { try driver.maxActiveClusters(fused, clusterSize: cluster, blockSize: StepWorkspace.threadsPerBlock) }
        } else {
            maxActiveClusters = 0
        }
    }

    /// The fused launch's cluster size: `requested` (EP_LL_CLUSTER) where the split can take
    /// effect (the dispatch blocks find their rows themselves, its share fits, the device launches
    /// clusters), else 1.
    static func llClusterSize(requested: Int, findsOwnRows: Bool, shareFits: Bool, deviceLaunchesClusters: Bool) -> Int {
        requested > 1 && findsOwnRows && shareFits && deviceLaunchesClusters ? requested : 1
    }

    /// Blocks per rank and cluster size of one fused launch of `ranks` ranks whose items want
    /// `blocks` blocks per rank (with the update block's spare), at most `room`: unchanged without
    /// clusters; with them a multiple of `llCluster`, rounded up where that stays within `room` and
    /// what `maxActiveClusters` hold at once (every rank's blocks resident, as without clusters),
    /// else down (the spare then goes: on an H100, ll-std's 33 blocks a rank become 32 with C = 2,
    /// 4 or 8; C = 3 keeps 33 where 11 clusters a rank fit). Where not even one cluster a rank
    /// fits, no clusters: the kernel then runs the whole prologue in every block (its cluster is
    /// the block itself).
    func fusedLaunch(blocks: Int, room: Int, ranks: Int) -> (blocks: Int, cluster: Int) {
        Self.fusedLaunch(blocks: blocks, room: room, ranks: ranks, cluster: llCluster, maxActiveClusters: maxActiveClusters)
    }

    static func fusedLaunch(blocks: Int, room: Int, ranks: Int, cluster: Int, maxActiveClusters: Int) -> (blocks: Int, cluster: Int) {
        let fit = min(room, maxActiveClusters / max(1, ranks) * cluster)
        guard cluster > 1, fit >= cluster else { return (blocks, 1) }
        let up = (blocks + cluster - 1) / cluster * cluster
        return (up <= fit ? up : fit / cluster * cluster, cluster)
    }
}
