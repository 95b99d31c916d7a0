import ExpertParallel
import ExpertParallelCUDA
import Foundation

/// R ranks on one GPU in one process, each with its own buffers; kernels see only the peer
/// table (every rank's buffer addresses) and their rank, as NCCL ranks do. A thin façade over
/// the `StepEngine`: its peer table is every rank's workspace here plus the tensors each call
/// is given (device memory, owned by the caller).
///
/// A step is `update`, `dispatch`, `combine` on a handle (`makeHandle()`; many can be live at
/// once), each taking every rank's tensors. Calls enqueue work on `stream` (or the one given)
/// and return without synchronising; errors found on the device (bad routing, timeouts) are read
/// by `checkStatus()`. A handle's routing tensors must stay unchanged until its last combine.
/// The calls without a handle use the group's own default handle.
public final class VirtualGPUGroup: StepGroup, @unchecked Sendable {
    public let config: GroupConfig
    public let device: GPUDevice
    public var stream: CUDAStream { engine.stream }
    /// Run-time kernel settings (pipeline depth, rows in flight, row pieces, blocks per SM).
    public var tuning: GPUTuning { engine.tuning }
    /// Whether the step kernels go as programmatic dependent launches (`GPUTuning.overlapsLaunches` where the device can).
    public var overlapsLaunches: Bool { engine.overlapsLaunches }
    /// The SMs the group's kernels may use.
    public var multiprocessors: Int { engine.multiprocessors }
    /// Thread blocks per rank for dispatch and combine in one launch (`.single`).
    public var blocksPerRank: Int { engine.blocksPerRank }
    /// The combine's blocks per rank in one launch covering all ranks (HT: 2 per SM at every R).
    public var combineBlocksPerRank: Int { engine.combineBlocksPerRank }
    /// Thread blocks per rank with one launch per rank (`.perRank`).
    public var blocksPerRankPerLaunch: Int { engine.blocksPerRankPerLaunch }
    public var localRanks: [Int] { engine.localRanks }
    public var transport: GPUTransport { engine.transport }
    let engine: StepEngine
    private let joinEvents: [CUDAEvent]
    /// The handle the calls without one use: made with the group, since a call may be captured
    /// into a CUDA graph, where nothing may be allocated.
    let implicitHandle: GPUStepHandle

    /// `multiprocessors`: how many SMs the group may use (default: all). `transport`: how the
    /// kernels reach the other ranks (`.staged` tests the put + signal shape on one GPU).
    public init(
        _ config: GroupConfig, device: GPUDevice, multiprocessors: Int? = nil, tuning: GPUTuning = GPUTuning(),
        transport: GPUTransport = .direct
    ) throws(EPError) {
        let config = try config.validatedForGPU()
        let tuning = try tuning.validated(config)
        if transport == .staged { try StepStaging.check(config) }
        let sms = multiprocessors ?? device.multiprocessors
        guard sms >= 1, sms <= device.multiprocessors else {
            throw .invalidArgument(field: "multiprocessors", value: "\(sms)", requirement: "must be in 1...\(device.multiprocessors)")
        }
        self.config = config
        self.device = device
        let workspace = StepWorkspace(config)
        try device.makeCurrent()
        let driver = device.driver
        // What this initialiser made, released if a later step fails (a failed group leaks nothing).
        var stream: CUDAStream?, events: [CUDAEvent] = [], pointers: [DevicePointer] = [], mask: DevicePointer?
        var built = false
        defer {
            if !built {
                for p in pointers { try? driver.free(p) }
                if let mask { try? driver.free(mask) }
                for e in events { try? driver.destroy(e) }
                if let stream { try? driver.destroy(stream) }
            }
        }
        let groupStream = try gpu { try driver.createStream() }
        stream = groupStream
        let rankStreams = try device.rankStreams(config.ranks)
        for _ in 0..<(config.ranks + 1) { events.append(try gpu { try driver.createEvent(flags: .disableTiming) }) }
        joinEvents = events
        for _ in 0..<config.ranks { pointers.append(try device.allocateZeroed(byteCount: workspace.bytes)) }
        let groupMask = try device.allocateMask(ranks: config.ranks)
        mask = groupMask
        engine = StepEngine(
            config: config, device: device, tuning: tuning, placement: .virtualRanks(rankStreams: rankStreams, joinEvents: events),
            workspaces: pointers, mask: groupMask, stream: groupStream, multiprocessors: sms, transport: transport,
            staging: transport == .staged ? try StepStaging(config, device: device) : nil)
        implicitHandle = try engine.makeHandle()
        built = true
    }

    deinit {
        let driver = device.driver
        // Work may still use the buffers freed below: if it cannot be waited for, they are left allocated.
        guard (try? engine.synchronize()) != nil else { return }
        implicitHandle.release()
        for p in engine.workspaces { try? driver.free(p) }
        try? driver.free(engine.mask)
        for e in joinEvents { try? driver.destroy(e) }
        try? driver.destroy(engine.stream)
    }

    /// A new step handle: a few KB of device memory per rank for the step's routing metadata.
    public func makeHandle() throws(EPError) -> GPUStepHandle { try engine.makeHandle() }


    /// Bytes of device memory one handle holds (all R ranks).
    public var handleBytes: Int { engine.workspace.handleStride * config.ranks }
}
