import ExpertParallel
import ExpertParallelCUDA
import Foundation

/// A call split in two: `.sendOnly` enqueues the sending half and returns, so the caller can
/// overlap other work; `complete()` enqueues the half that waits for the data.
public enum CallPhase: Sendable { case whole, sendOnly }

/// The second half of a send-only call, enqueued by `complete()`.
struct PendingCall {
    var name: String
    var enqueue: (CUDAStream?) throws(EPError) -> Void
}

/// How a virtual group runs one call for its R ranks.
public enum LaunchMode: Sendable {
    /// One launch covering every rank (the rank is a block coordinate): the fast path.
    case single
    /// One launch per rank on its own stream, each rank limited to 1/R of the SMs, joined by
    /// events: shows that ranks meet only through flags.
    case perRank
}

/// R ranks on one GPU in one process, each with its own buffers; kernels see only the peer
/// table (every rank's buffer addresses) and their rank, as NCCL ranks will.
///
/// A step is `update`, `dispatch`, `combine`, each taking every rank's tensors (device memory,
/// owned by the caller). Calls enqueue work on `stream` and return without synchronising;
/// errors found on the device (bad routing, timeouts) are read by `checkStatus()`.
/// The routing tensors given to `update` must stay unchanged until that step's combine.
public final class VirtualGPUGroup: @unchecked Sendable {
    public let config: GroupConfig
    public let device: GPUDevice
    /// Thread blocks per rank for dispatch and combine in one launch (`.single`).
    public let blocksPerRank: Int
    /// Thread blocks per rank with one launch per rank (`.perRank`): all R launches must be
    /// resident at once, since their ranks wait for each other.
    public let blocksPerRankPerLaunch: Int
    public let stream: CUDAStream
    let workspace: StepWorkspace
    let workspaces: [DevicePointer]
    let mask: DevicePointer
    private let lock = NSLock()
    private let launchLock = NSLock()
    private var kernels: [StepKernels.Variant: StepKernels] = [:]
    private var step: (routing: [TensorRef], variantIndexBytes: Int)?
    private var pending: PendingCall?
    private let rankStreams: [CUDAStream]
    private let joinEvents: [CUDAEvent]
    private let args: StepArguments

    static let threadsPerBlock = 512
    /// Threads of the update kernel's one block per rank (EP_UPDATE_WARPS, EP_HT_UPDATE_WARPS).
    var updateThreads: Int { config.algorithm == .lowLatency ? 256 : 512 }

    /// Run-time kernel settings (pipeline depth, rows in flight, row pieces, blocks per SM).
    public let tuning: GPUTuning

    /// `multiprocessors`: how many SMs the group may use (default: all).
    public init(
        _ config: GroupConfig, device: GPUDevice, multiprocessors: Int? = nil, tuning: GPUTuning = GPUTuning()
    ) throws(EPError) {
        let config = try config.validatedForGPU()
        self.tuning = try tuning.validated(config)
        let sms = multiprocessors ?? device.multiprocessors
        guard sms >= 1, sms <= device.multiprocessors else {
            throw .invalidArgument(field: "multiprocessors", value: "\(sms)", requirement: "must be in 1...\(device.multiprocessors)")
        }
        self.config = config
        self.device = device
        // Measured on an H100: 2 blocks per SM for R ≥ 2, 1 for R = 1.
        blocksPerRank = max(1, sms * (tuning.blocksPerMultiprocessor ?? min(config.ranks, 2)) / config.ranks)
        blocksPerRankPerLaunch = max(1, sms / config.ranks)
        let workspace = StepWorkspace(config)
        self.workspace = workspace
        try device.makeCurrent()
        let driver = device.driver
        stream = try gpu { try driver.createStream() }
        rankStreams = try device.rankStreams(config.ranks)
        joinEvents = try gpu { try (0..<config.ranks + 1).map { _ in try driver.createEvent(flags: .disableTiming) } }
        var pointers: [DevicePointer] = []
        for _ in 0..<config.ranks {
            let p = try gpu { try driver.allocate(byteCount: workspace.bytes) }
            try gpu { try driver.fill(p, byte: 0, byteCount: workspace.bytes) }
            pointers.append(p)
        }
        workspaces = pointers
        mask = try device.allocateMask(ranks: config.ranks)
        args = StepArguments(ranks: config.ranks)
    }

    deinit {
        let driver = device.driver
        try? driver.synchronizeContext()   // work may still use the buffers freed below
        for p in workspaces { try? driver.free(p) }
        try? driver.free(mask)
        for e in joinEvents { try? driver.destroy(e) }
        try? driver.destroy(stream)
    }

    // MARK: kernels

    func kernels(_ variant: StepKernels.Variant) throws(EPError) -> StepKernels {
        if let k = lock.withLock({ kernels[variant] }) { return k }
        let k = try StepKernels(device: device, config: config, variant: variant, tuning: tuning)
        lock.withLock { kernels[variant] = k }
        return k
    }

    // MARK: launches

    /// Fills the kernel argument block (`EpArgs` of ep_step.cuh) and launches `function`.
    /// `sync` holds the kernel's EP_SYNC_* bits; `fill` sets each rank's tensor words
    /// (x, topk_idx, topk_weights, recv, recv_idx, recv_weights, out, -, tokens, weight_grads_in,
    /// weight_grads_out).
    func launch(
        _ function: CUDAFunction, threads: Int, blocks: Int, mode: LaunchMode, sync: UInt64, weighted: Bool, slices: Int,
        stream callerStream: CUDAStream?, rank fill: (Int, UnsafeMutableBufferPointer<UInt64>) -> Void
    ) throws(EPError) {
        // One argument block per group: calls from several threads take turns filling and launching.
        launchLock.lock()
        defer { launchLock.unlock() }
        let r = config.ranks
        args.fill(workspace: { self.workspaces[$0] }, mask: mask, timeout: config.timeout, firstRank: 0, sync: sync,
                  weighted: weighted, pieces: slices, rank: fill)
        let driver = device.driver
        let target = callerStream ?? stream
        try gpu {
            switch mode {
            case .single:
                try args.launch(function, on: device, grid: .init(x: UInt32(blocks), y: UInt32(r)), threads: threads, stream: target)
            case .perRank:
                try driver.record(joinEvents[r], on: target)
                for rank in 0..<r {
                    try driver.wait(rankStreams[rank], for: joinEvents[r])
                    args.setFirstRank(rank)
                    try args.launch(function, on: device, grid: .init(x: UInt32(blocks), y: 1), threads: threads, stream: rankStreams[rank])
                    try driver.record(joinEvents[rank], on: rankStreams[rank])
                }
                for rank in 0..<r { try driver.wait(target, for: joinEvents[rank]) }
            }
        }
    }

    func blocks(_ mode: LaunchMode) -> Int { mode == .single ? blocksPerRank : blocksPerRankPerLaunch }

    /// Rows are cut into pieces so that every warp of the rank's blocks has work.
    func slices(tokens: Int, mode: LaunchMode) -> Int {
        StepArguments.rowPieces(tuning, blocks: blocks(mode), tokens: tokens, rowBytes: config.rowBytes)
    }

    /// Fails while a send-only call waits for `complete()`: no other call may come between.
    func checkNothingPending() throws(EPError) {
        lock.lock()
        defer { lock.unlock() }
        if let pending { throw .wrongOrder("complete() the pending send-only \(pending.name) first") }
    }

    func rememberStep(_ routing: [TensorRef], _ indexBytes: Int) {
        lock.withLock { step = (routing, indexBytes) }
    }

    func forgetStep() {
        lock.withLock { step = nil }
    }

    func currentStep() throws(EPError) -> (routing: [TensorRef], variantIndexBytes: Int) {
        try checkNothingPending()
        lock.lock()
        defer { lock.unlock() }
        guard let step else { throw .wrongOrder("dispatch and combine need update with this step's topkIdx first") }
        return step
    }

    func setPending(_ call: PendingCall) { lock.withLock { pending = call } }

    func takePending() throws(EPError) -> PendingCall {
        lock.lock()
        defer { lock.unlock() }
        guard let call = pending else { throw .wrongOrder("complete() needs a dispatch or combine issued with phase .sendOnly") }
        pending = nil
        return call
    }
}
