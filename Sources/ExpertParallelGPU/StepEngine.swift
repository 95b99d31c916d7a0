import ExpertParallel
import ExpertParallelCUDA
import Foundation

/// The one step machinery under every GPU group: kernel variants, the argument block, launches,
/// the pending half of a send-only call, status and layout reads. A group is a façade that
/// gives it a peer table (every rank's workspace and buffers) and says where its ranks run:
/// - `.virtualRanks`: all R ranks in this process on one GPU, one launch covering them all (or
///   one launch per rank on its own stream);
/// - `.process(rank)`: one rank of a multi-process group; the others' buffers are mapped here.
/// Kernels see nothing else, so a new transport or row format plugs in here once.
final class StepEngine: @unchecked Sendable {
    enum Placement {
        case virtualRanks(rankStreams: [CUDAStream], joinEvents: [CUDAEvent])
        case process(rank: Int)
    }

    let config: GroupConfig
    /// The call checks' shapes, worked out once (checking every rank's tensors allocates nothing).
    let shapes: CallShapes
    let device: GPUDevice
    let tuning: GPUTuning
    /// The one-launch step kernels go as programmatic dependent launches (`overlapsLaunches(_:device:placement:)`).
    let overlapsLaunches: Bool
    let workspace: StepWorkspace
    let placement: Placement
    /// Every rank's group words (`WS_*`), at addresses valid in this process.
    let workspaces: [DevicePointer]
    let mask: DevicePointer
    /// The group's own stream: calls given no stream run here.
    let stream: CUDAStream
    /// The ranks this process drives, in the order of the per-rank arrays of every call.
    let localRanks: [Int]
    /// Dispatch/combine blocks per rank: one launch covering every local rank, and one launch
    /// per rank (all R resident at once, since their ranks wait for each other).
    let blocksPerRank: Int
    let blocksPerRankPerLaunch: Int
    /// The combine's blocks per rank in one launch: for HT 2 per SM at every R unless tuned, which
    /// differs from `blocksPerRank` only at R = 1 (its loads want every warp an SM holds; an H200
    /// at R = 1, ht-std: 47.3 µs with 1 per SM, 42.1 with 2); per-rank launches keep theirs.
    let combineBlocksPerRank: Int
    /// The FP8 chunks the LL dispatch loads ahead of its row lookups (`StepKernels.fp8ChunksAhead`
    /// for `blocksPerRank`): one value for the group, so every kernel variant is compiled with it.
    let fp8ChunksAhead: Int
    /// How the kernels reach the other ranks; `staging` holds the staged transport's areas.
    let transport: GPUTransport
    let staging: StepStaging?

    private let lock = NSLock()
    private let launchLock = NSLock()
    /// The SMs the group's kernels may use.
    let multiprocessors: Int
    private var kernelCache: [StepKernels.Variant: StepKernels] = [:]
    private var pending: PendingCall?
    private let args: StepArguments
    /// Caller streams given to calls since the last `synchronize()`: it waits for them too.
    private var callerStreams: [CUDAStream] = []

    /// Dependent launches where the tuning asks, the device and driver can, and the ranks are
    /// virtual ranks of this process. NCCL ranks launch plainly until a run on several GPUs has
    /// checked them (their kernels wait for peers in other processes; none has run dependent yet).
    static func overlapsLaunches(_ tuning: GPUTuning, device: GPUDevice, placement: Placement) -> Bool {
        guard case .virtualRanks = placement else { return false }
        return tuning.overlapsLaunches && device.launchesDependents
    }

    init(
        config: GroupConfig, device: GPUDevice, tuning: GPUTuning, placement: Placement, workspaces: [DevicePointer],
        mask: DevicePointer, stream: CUDAStream, multiprocessors sms: Int, transport: GPUTransport = .direct,
        staging: StepStaging? = nil
    ) {
        self.transport = transport
        self.staging = staging
        self.config = config
        shapes = CallShapes(validated: config)
        self.device = device
        self.tuning = tuning
        overlapsLaunches = Self.overlapsLaunches(tuning, device: device, placement: placement)
        self.placement = placement
        self.workspaces = workspaces
        self.mask = mask
        self.stream = stream
        multiprocessors = sms
        var everyRankHere = false
        if case .virtualRanks = placement { everyRankHere = true }
        workspace = StepWorkspace(config, transport: transport, updateChunkTokens: tuning.updateChunkTokens, everyRankHere: everyRankHere)
        args = StepArguments(ranks: config.ranks)
        switch placement {
        case .virtualRanks:
            localRanks = Array(0..<config.ranks)
            // Measured on an H100: 2 blocks per SM for R ≥ 2, 1 for R = 1.
            blocksPerRank = max(1, sms * (tuning.blocksPerMultiprocessor ?? min(config.ranks, 2)) / config.ranks)
            blocksPerRankPerLaunch = max(1, sms / config.ranks)
            combineBlocksPerRank = config.algorithm == .highThroughput
                ? max(1, sms * (tuning.blocksPerMultiprocessor ?? 2) / config.ranks) : blocksPerRank
        case .process(let rank):
            localRanks = [rank]
            // One GPU per rank: the rank's blocks may fill it.
            blocksPerRank = max(1, sms * (tuning.blocksPerMultiprocessor ?? 2))
            blocksPerRankPerLaunch = blocksPerRank
            combineBlocksPerRank = blocksPerRank
        }
        fp8ChunksAhead = StepKernels.fp8ChunksAhead(config, tuning, blocks: blocksPerRank)
    }

    var location: MemoryLocation { .device(device.ordinal) }

    /// Ranks of another process meet through flags in every call; virtual ranks only when
    /// launched separately.
    func meetsThroughFlags(_ mode: LaunchMode) -> Bool {
        if case .process = placement { return true }
        return mode == .perRank
    }

    func blocks(_ mode: LaunchMode) -> Int { mode == .single ? blocksPerRank : blocksPerRankPerLaunch }
    func combineBlocks(_ mode: LaunchMode) -> Int { mode == .single ? combineBlocksPerRank : blocksPerRankPerLaunch }

    func makeHandle() throws(EPError) -> GPUStepHandle {
        // Freeing a handle waits for the work that may read it: this group's streams.
        try GPUStepHandle(device: device, localRanks: localRanks, workspace: workspace) { [weak self] () throws(EPError) in
            try self?.synchronize()
        }
    }

    /// Every stream this group's work may be on: its own, its rank streams, and the caller
    /// streams given since the last call.
    func streamsInUse() -> [CUDAStream] {
        var streams = [stream] + lock.withLock { callerStreams }
        if case .virtualRanks(let rankStreams, _) = placement { streams += rankStreams }
        return streams
    }

    /// Waits for the work of this group's calls: its streams, not the whole context, so a CUDA
    /// graph being captured on another thread is not disturbed. Control path.
    func synchronize() throws(EPError) {
        try device.makeCurrent()
        let driver = device.driver
        try relaxed { () throws(EPError) in
            for s in streamsInUse() { try gpu { try driver.synchronize(s) } }
        }
        lock.withLock { callerStreams.removeAll() }
    }

    // MARK: kernels

    func kernels(_ requested: StepKernels.Variant) throws(EPError) -> StepKernels {
        var variant = requested
        if case .virtualRanks = placement { variant.oneDevice = true }
        variant.fp8ChunksAhead = fp8ChunksAhead
        if let k = lock.withLock({ kernelCache[variant] }) { return k }
        try device.makeCurrent()
        let k = try StepKernels(device: device, config: config, variant: variant, tuning: tuning)
        lock.withLock { kernelCache[variant] = k }
        return k
    }

    // MARK: launches

    /// Fills the argument block and launches `function` for every local rank: the launch's
    /// fields, each rank's group words and (local ranks) `handle`'s words; `fill` sets the
    /// tensors of rank r (every rank of the group: the peer table).
    func launch(
        _ function: CUDAFunction, threads: Int, blocks: Int, mode: LaunchMode, sync: SyncBits, weighted: Bool, slices: Int,
        handle: GPUStepHandle, stream callerStream: CUDAStream?, fill: (Int, RankArguments) -> Void
    ) throws(EPError) {
        let handleBase = try handle.base()
        // One argument block per group: calls from several threads take turns filling and launching.
        launchLock.lock()
        defer { launchLock.unlock() }
        args.reset(mask: mask, timeout: config.timeout, firstRank: localRanks[0], sync: sync, weighted: weighted, slices: slices)
        for r in 0..<config.ranks {
            let words = args.rank(r)
            fill(r, words)
            words.set(.workspace, workspaces[r])
            if let staging { words.set(.stage, staging.descriptors[r]) }
        }
        for (i, rank) in localRanks.enumerated() { args.rank(rank).set(.handle, handleBase.advanced(by: i * handle.stride)) }
        try device.makeCurrent()
        let target = callerStream ?? stream
        if let callerStream { lock.withLock { if !callerStreams.contains(callerStream) { callerStreams.append(callerStream) } } }
        let driver = device.driver
        try gpu {
            switch (placement, mode) {
            case (.process, _), (.virtualRanks, .single):
                let grid = LaunchDimensions(x: UInt32(blocks), y: UInt32(localRanks.count))
                try args.launch(function, on: device, grid: grid, threads: threads, stream: target, dependent: overlapsLaunches)
            case (.virtualRanks(let rankStreams, let joinEvents), .perRank):
                LaunchGate.lock.lock()   // every rank's launch reaches the GPU before another module or function load
                defer { LaunchGate.lock.unlock() }
                let r = config.ranks
                try driver.record(joinEvents[r], on: target)
                for rank in 0..<r {
                    try driver.wait(rankStreams[rank], for: joinEvents[r])
                    args[.firstRank] = UInt64(rank)
                    try args.launch(function, on: device, grid: .init(x: UInt32(blocks), y: 1), threads: threads, stream: rankStreams[rank],
                                    dependent: false)
                    try driver.record(joinEvents[rank], on: rankStreams[rank])
                }
                for rank in 0..<r { try driver.wait(target, for: joinEvents[rank]) }
            }
        }
    }

    // MARK: the pending half of a send-only call

    /// Fails while a send-only call waits for `complete()`: no other call may come between.
    func checkNothingPending() throws(EPError) {
        lock.lock()
        defer { lock.unlock() }
        if let pending { throw .sendOnlyOpen(pending.name) }
    }

    func setPending(_ call: PendingCall) { lock.withLock { pending = call } }

    func takePending() throws(EPError) -> PendingCall {
        lock.lock()
        defer { lock.unlock() }
        guard let call = pending else { throw .nothingToComplete }
        pending = nil
        return call
    }
}

/// The second half of a send-only call, enqueued by `complete()`.
struct PendingCall {
    var name: String
    var enqueue: (CUDAStream?) throws(EPError) -> Void
}

func address(_ tensor: TensorRef) -> UInt64 { UInt64(UInt(bitPattern: tensor.address)) }

extension TensorRef {
    /// The tensor's address as the driver's copies and fills take it (a device tensor's).
    public var devicePointer: DevicePointer { DevicePointer(rawValue: UInt64(UInt(bitPattern: address))) }
}

/// Kernels read rows in 8- or 16-byte vectors and ids and weights whole: a misaligned address
/// would fault on the device, so it is an error here.
/// The name is built only for the error, so the data path allocates nothing for it.
func requireAligned(_ tensor: TensorRef?, _ name: @autoclosure () -> String, _ bytes: Int) throws(EPError) {
    guard let tensor else { return }
    guard address(tensor) % UInt64(bytes) == 0 else {
        throw .invalidArgument(field: "\(name()).address", value: "\(address(tensor))", requirement: "must be a multiple of \(bytes) bytes")
    }
}
