import ExpertParallel
import ExpertParallelCUDA
import Foundation

/// One rank of a group whose ranks are processes, one GPU each, joined by an NCCL communicator
/// (docs/architecture.md, "Layers"). A thin façade over the `StepEngine`, as `VirtualGPUGroup`
/// is: its peer table holds the other ranks' buffers, mapped into this process.
///
/// Everything another rank reads or writes lives in buffers this group owns and shares at
/// creation, so that their addresses are fixed: the receive rows (dispatch writes them), the
/// received local idx and weights, the expert outputs (combine reads them; write the experts'
/// results there) and, for HT's backward pass, the weight gradients per received row or slot.
/// They come in `bufferSlots` sets (default 2), so that two steps' rows can be in flight: a
/// dispatch names its slot (its output buffers), and that step's combine reads the same slot.
/// The buffers come from `ncclMemAlloc` and are registered as NCCL windows; on NCCL 2.28, which
/// has no host query for a peer's window address (2.30 has), their handles are all-gathered
/// through the communicator and mapped here (`PeerBuffers`).
public final class NCCLRankGroup: StepGroup, @unchecked Sendable {
    public let config: GroupConfig
    public let device: GPUDevice
    public let rank: Int
    public let comm: NCCLComm
    public var tuning: GPUTuning { engine.tuning }
    /// Whether the step kernels go as programmatic dependent launches: not for NCCL ranks yet (`StepEngine.overlapsLaunches`).
    public var overlapsLaunches: Bool { engine.overlapsLaunches }
    /// Whether a stacked dispatch with routing (`dispatch(_:stacked:direction:options:)`) runs the
    /// update and the dispatch as one launch (LL, the kernel fits, `tuning.fusesUpdate`); the
    /// separate `update` and `dispatch` calls are a launch each.
    public var fusesUpdate: Bool { engine.canFuseUpdate(CallOptions()) }
    public var stream: CUDAStream { engine.stream }
    public var localRanks: [Int] { [rank] }
    /// Sets of receive and expert-output buffers; each step's rows use one.
    public let bufferSlots: Int
    /// The SMs this rank's kernels may use.
    public var multiprocessors: Int { engine.multiprocessors }
    /// This rank's buffers of each slot.
    public let slots: [SlotBuffers]

    /// `receiveShape` rows of this rank in slot 0: dispatch output.
    public var receivedTokens: TensorRef { slots[0].receivedTokens }
    /// `receiveRoutingShape` local expert ids (int32) and weights (float32) in slot 0, where the layout has them.
    public var receivedIndices: TensorRef? { slots[0].receivedIndices }
    public var receivedWeights: TensorRef? { slots[0].receivedWeights }
    /// `receiveShape` in slot 0: where this rank's experts put their outputs for combine.
    public var expertOutputs: TensorRef { slots[0].expertOutputs }
    /// HT backward: `receiveRoutingShape` float32 gradients of the received weights, in slot 0.
    public var weightGradients: TensorRef? { slots[0].weightGradients }

    let nccl: NCCLLibrary
    let engine: StepEngine
    /// Every rank's shared buffers, this rank's own included (local addresses).
    let peers: [SharedBuffers]
    /// How the shared buffers were allocated and mapped (`PeerBuffers`).
    public var sharing: PeerSharing { shared.sharing }
    private let shared: PeerBuffers
    /// The handle whose dispatch each buffer slot holds now: a combine of any other handle that
    /// used the slot would read another step's rows (`slotHolder(_:)`, `hold(_:by:)`).
    private let holders = SlotHolders()
    /// The handle the calls without one use: made with the group, since a call may be captured
    /// into a CUDA graph, where nothing may be allocated.
    public let implicitHandle: GPUStepHandle

    /// One slot's buffers of this rank, as tensors.
    public struct SlotBuffers: Sendable {
        public let receivedTokens: TensorRef
        public let receivedIndices: TensorRef?
        public let receivedWeights: TensorRef?
        public let expertOutputs: TensorRef
        public let weightGradients: TensorRef?
        /// FP8 groups: `receiveScalesShape` scale words of the received e4m3 rows.
        public let receivedScales: TensorRef?

        /// The slot's receive buffers as dispatch outputs.
        public var dispatchOutput: DispatchOutput {
            DispatchOutput(tokens: receivedTokens, topkIdx: receivedIndices, topkWeights: receivedWeights, scales: receivedScales)
        }
    }

    /// The buffers of one rank that the others reach: its workspace, then per slot its
    /// received rows, ids and weights, expert outputs, weight gradients and FP8 scale words.
    struct SharedBuffers {
        static let perSlot = 6
        var workspace: DevicePointer
        var slots: [[DevicePointer]]

        init(_ p: [DevicePointer]) {
            workspace = p[0]
            slots = stride(from: 1, to: p.count, by: Self.perSlot).map { Array(p[$0..<($0 + Self.perSlot)]) }
        }

        func received(_ slot: Int) -> DevicePointer { slots[slot][0] }
        func receivedIndices(_ slot: Int) -> DevicePointer { slots[slot][1] }
        func receivedWeights(_ slot: Int) -> DevicePointer { slots[slot][2] }
        func expertOutputs(_ slot: Int) -> DevicePointer { slots[slot][3] }
        func weightGradients(_ slot: Int) -> DevicePointer { slots[slot][4] }
        func receivedScales(_ slot: Int) -> DevicePointer { slots[slot][5] }
    }

    /// Joins: allocates this rank's shared buffers, shares them through `comm` and maps the other
    /// ranks' buffers (`PeerBuffers`). Collective: every rank of `comm` calls it; each wait for
    /// the others is bounded by the config's timeout. `comm` should be non-blocking
    /// (`NCCLLibrary.initRank` makes it so).
    public init(
        _ config: GroupConfig, device: GPUDevice, comm: NCCLComm, nccl: NCCLLibrary, multiprocessors: Int? = nil,
        tuning: GPUTuning = GPUTuning(), sharing: PeerSharing = .ncclWindows, bufferSlots: Int = 2
    ) throws(EPError) {
        let config = try config.validatedForGPU()
        let tuning = try tuning.validated(config)
        let (rank, size) = try gpu { (try nccl.userRank(comm), try nccl.count(comm)) }
        guard size == config.ranks else {
            throw .invalidConfig(field: "ranks", value: "\(config.ranks)", requirement: "must equal the communicator's size (\(size))")
        }
        let sms = multiprocessors ?? device.multiprocessors
        guard sms >= 1, sms <= device.multiprocessors else {
            throw .invalidArgument(field: "multiprocessors", value: "\(sms)", requirement: "must be in 1...\(device.multiprocessors)")
        }
        guard bufferSlots >= 1, bufferSlots <= 8 else {
            throw .invalidArgument(field: "bufferSlots", value: "\(bufferSlots)", requirement: "must be in 1...8")
        }
        self.config = config
        self.device = device
        self.rank = rank
        self.comm = comm
        self.nccl = nccl
        self.bufferSlots = bufferSlots
        let workspace = StepWorkspace(config, everyRankHere: false)   // (its sizes; the kernels get theirs from StepKernels.Variant)
        try device.makeCurrent()
        let driver = device.driver
        let stream = try gpu { try driver.createStream() }
        var built = false
        defer { if !built { try? driver.destroy(stream) } }   // a failed join leaks nothing here

        let receivedBytes = config.receiveShape.reduce(1, *) * config.receiveElementType.byteSize
        let rowBytes = config.receiveShape.reduce(1, *) * config.elementType.byteSize
        let routingBytes = max(config.receiveRoutingShape?.reduce(1, *) ?? 0, 1) * 4
        let scaleBytes = max(config.receiveScalesShape?.reduce(1, *) ?? 0, 1) * 4
        let perSlot = [receivedBytes, routingBytes, routingBytes, rowBytes, routingBytes, scaleBytes]
        let sizes = [workspace.bytes] + Array(repeating: perSlot, count: bufferSlots).flatMap { $0 }
        let shared = try PeerBuffers(
            sizes: sizes, sharing: sharing, device: device, comm: comm, nccl: nccl, rank: rank, ranks: config.ranks,
            stream: stream, timeout: config.timeout)
        self.shared = shared
        let mine = SharedBuffers(shared.local)
        func view(_ p: DevicePointer, _ type: DataType, _ shape: [Int]) -> TensorRef {
            TensorRef(address: UnsafeMutableRawPointer(bitPattern: UInt(p.rawValue)), dtype: type, shape: shape, location: .device(device.ordinal))
        }
        slots = (0..<bufferSlots).map { s in
            SlotBuffers(
                receivedTokens: view(mine.received(s), config.receiveElementType, config.receiveShape),
                receivedIndices: config.receiveRoutingShape.map { view(mine.receivedIndices(s), .i32, $0) },
                receivedWeights: config.receiveRoutingShape.map { view(mine.receivedWeights(s), .f32, $0) },
                expertOutputs: view(mine.expertOutputs(s), config.elementType, config.receiveShape),
                weightGradients: config.algorithm == .highThroughput ? config.receiveRoutingShape.map { view(mine.weightGradients(s), .f32, $0) } : nil,
                receivedScales: config.receiveScalesShape.map { view(mine.receivedScales(s), config.fp8?.scaleType ?? .f32, $0) })
        }
        peers = shared.byRank.map(SharedBuffers.init)
        let mask = try device.allocateMask(ranks: config.ranks)
        engine = StepEngine(
            config: config, device: device, tuning: tuning, placement: .process(rank: rank), workspaces: peers.map(\.workspace),
            mask: mask, stream: stream, multiprocessors: sms)
        implicitHandle = try engine.makeHandle()
        built = true
    }

    deinit {
        let driver = device.driver
        try? device.makeCurrent()   // the last reference may go on any thread
        // Work may still use the buffers freed below: if it cannot be waited for, they are left allocated.
        guard (try? engine.synchronize()) != nil else { return }
        implicitHandle.release()
        let everyone = (try? driver.read(UInt64.self, from: engine.mask, count: 1)[0]).map { RankMask(bits: $0) == RankMask.all(config.ranks) } ?? false
        shared.release(collectively: everyone)
        try? driver.free(engine.mask)
        try? driver.destroy(engine.stream)
    }

    /// A new step handle: a few KB of device memory for this rank's routing metadata.
    public func makeHandle() throws(EPError) -> GPUStepHandle { try engine.makeHandle() }

}

/// Which handle's dispatch each buffer slot holds.
final class SlotHolders: @unchecked Sendable {
    private let lock = NSLock()
    private var holders: [Int: ObjectIdentifier] = [:]

    func hold(_ slot: Int, by handle: GPUStepHandle) { lock.withLock { holders[slot] = ObjectIdentifier(handle) } }
    func holds(_ slot: Int, _ handle: GPUStepHandle) -> Bool { lock.withLock { holders[slot] == ObjectIdentifier(handle) } }
}

extension NCCLRankGroup {
    /// The slot `handle`'s dispatch used, checked to still hold that dispatch's rows; `use`
    /// names the call in the errors ("combine", "copyReceived").
    func slotOfDispatch(_ handle: GPUStepHandle, for use: String = "combine") throws(EPError) -> Int {
        guard let slot = handle.bufferSlot else { throw .wrongOrder("\(use) needs a dispatch of this handle's step first") }
        guard holders.holds(slot, handle) else {
            throw .wrongOrder("buffer slot \(slot), where this handle's step was dispatched, holds a later dispatch's rows now: \(use) a step before its slot is used again (bufferSlots = \(bufferSlots))")
        }
        return slot
    }

    func recordDispatch(_ handle: GPUStepHandle, slot: Int) {
        holders.hold(slot, by: handle)
        handle.setDispatched(slot: slot)
    }
}
