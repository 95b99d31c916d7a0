import ExpertParallel
import ExpertParallelCUDA

/// One rank of a group whose ranks are processes, one GPU each, joined by an NCCL communicator
/// (DESIGN.md, layer 4, "NCCL ranks"). It runs the same kernels as `VirtualGPUGroup`'s
/// per-rank launches: the peer table holds the other ranks' buffers, mapped into this process.
///
/// Everything another rank reads or writes lives in buffers this group owns and shares at
/// creation, so that their addresses are fixed: the receive rows (dispatch writes them), the
/// received local idx and weights, the expert outputs (combine reads them; write the experts'
/// results there) and, for HT's backward pass, the weight gradients per received row or slot.
/// The buffers come from `ncclMemAlloc` and are registered as NCCL windows; on NCCL 2.28, which
/// has no host query for a peer's window address (2.30 has), their handles are all-gathered
/// through the communicator and mapped here (`PeerBuffers`).
public final class NCCLRankGroup: @unchecked Sendable {
    public let config: GroupConfig
    public let device: GPUDevice
    public let rank: Int
    public let comm: NCCLComm
    public let tuning: GPUTuning
    public let stream: CUDAStream
    /// `receiveShape` rows of this rank: dispatch output.
    public let receivedTokens: TensorRef
    /// `receiveRoutingShape` local expert ids (int32) and weights (float32), where the layout has them.
    public let receivedIndices: TensorRef?
    public let receivedWeights: TensorRef?
    /// `receiveShape`: where this rank's experts put their outputs for combine.
    public let expertOutputs: TensorRef
    /// HT backward: `receiveRoutingShape` float32 gradients of the received weights.
    public let weightGradients: TensorRef?

    let nccl: NCCLLibrary
    let workspace: StepWorkspace
    let blocks: Int
    /// Every rank's shared buffers, this rank's own included (local addresses).
    let peers: [SharedBuffers]
    /// How the shared buffers were allocated and mapped (`PeerBuffers`).
    public var sharing: PeerSharing { shared.sharing }
    private let shared: PeerBuffers
    let mask: DevicePointer
    let args: StepArguments
    var kernelCache: [StepKernels.Variant: StepKernels] = [:]
    var step: (routing: TensorRef, indexBytes: Int)?
    var pending: PendingCall?

    /// The buffers of one rank that the others reach.
    struct SharedBuffers {
        var workspace: DevicePointer
        var received: DevicePointer
        var receivedIndices: DevicePointer
        var receivedWeights: DevicePointer
        var expertOutputs: DevicePointer
        var weightGradients: DevicePointer

        var all: [DevicePointer] { [workspace, received, receivedIndices, receivedWeights, expertOutputs, weightGradients] }
        init(_ p: [DevicePointer]) {
            (workspace, received, receivedIndices, receivedWeights, expertOutputs, weightGradients) = (p[0], p[1], p[2], p[3], p[4], p[5])
        }
    }

    /// Joins: allocates this rank's shared buffers, shares them through `comm` and maps the other
    /// ranks' buffers (`PeerBuffers`). Collective: every rank of `comm` calls it; each wait for
    /// the others is bounded by the config's timeout. `comm` should be non-blocking
    /// (`NCCLLibrary.initRank` makes it so).
    public init(
        _ config: GroupConfig, device: GPUDevice, comm: NCCLComm, nccl: NCCLLibrary, multiprocessors: Int? = nil,
        tuning: GPUTuning = GPUTuning(), sharing: PeerSharing = .ncclWindows
    ) throws(EPError) {
        let config = try config.validatedForGPU()
        self.tuning = try tuning.validated(config)
        let (rank, size) = try gpu { (try nccl.userRank(comm), try nccl.count(comm)) }
        guard size == config.ranks else {
            throw .invalidConfig(field: "ranks", value: "\(config.ranks)", requirement: "must equal the communicator's size (\(size))")
        }
        let sms = multiprocessors ?? device.multiprocessors
        guard sms >= 1, sms <= device.multiprocessors else {
            throw .invalidArgument(field: "multiprocessors", value: "\(sms)", requirement: "must be in 1...\(device.multiprocessors)")
        }
        self.config = config
        self.device = device
        self.rank = rank
        self.comm = comm
        self.nccl = nccl
        // One GPU per rank: the rank's blocks may fill it.
        blocks = max(1, sms * (tuning.blocksPerMultiprocessor ?? 2))
        let workspace = StepWorkspace(config)
        self.workspace = workspace
        try device.makeCurrent()
        let driver = device.driver
        let stream = try gpu { try driver.createStream() }
        self.stream = stream
        var built = false
        defer { if !built { try? driver.destroy(stream) } }   // a failed join leaks nothing here

        let rowBytes = config.receiveShape.reduce(1, *) * config.elementType.byteSize
        let routingCount = config.receiveRoutingShape?.reduce(1, *) ?? 0
        let sizes = [workspace.bytes, rowBytes, max(routingCount, 1) * 4, max(routingCount, 1) * 4, rowBytes, max(routingCount, 1) * 4]
        let shared = try PeerBuffers(
            sizes: sizes, sharing: sharing, device: device, comm: comm, nccl: nccl, rank: rank, ranks: config.ranks,
            stream: stream, timeout: config.timeout)
        self.shared = shared
        let mine = SharedBuffers(shared.local)
        func view(_ p: DevicePointer, _ type: DataType, _ shape: [Int]) -> TensorRef {
            TensorRef(address: UnsafeMutableRawPointer(bitPattern: UInt(p.rawValue)), dtype: type, shape: shape, location: .device(device.ordinal))
        }
        receivedTokens = view(mine.received, config.elementType, config.receiveShape)
        expertOutputs = view(mine.expertOutputs, config.elementType, config.receiveShape)
        receivedIndices = config.receiveRoutingShape.map { view(mine.receivedIndices, .i32, $0) }
        receivedWeights = config.receiveRoutingShape.map { view(mine.receivedWeights, .f32, $0) }
        weightGradients = config.algorithm == .highThroughput ? config.receiveRoutingShape.map { view(mine.weightGradients, .f32, $0) } : nil
        peers = shared.byRank.map(SharedBuffers.init)
        mask = try device.allocateMask(ranks: config.ranks)
        args = StepArguments(ranks: config.ranks)
        built = true
    }

    deinit {
        let driver = device.driver
        try? device.makeCurrent()   // the last reference may go on any thread
        try? driver.synchronizeContext()   // work may still use the buffers freed below
        let everyone = (try? driver.read(UInt64.self, from: mask, count: 1)[0]).map { RankMask(bits: $0) == RankMask.all(config.ranks) } ?? false
        shared.release(collectively: everyone)
        try? driver.free(mask)
        try? driver.destroy(stream)
    }
}
