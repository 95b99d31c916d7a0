import CExpertParallel
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation

/// What a group's backend does for the ABI's group calls. Both backends take the same
/// arguments; the host ignores the stream and launch mode, and reports errors from the calls.
protocol GroupBackend: AnyObject {
    var kind: epBackend_t { get }
    func updateAll(_ inputs: [epUpdateInputs_t], _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws
    func dispatchAll(
        _ inputs: [epDispatchInputs_t], _ outputs: [epDispatchOutputs_t], _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?) throws
    func combineAll(
        _ inputs: [epCombineInputs_t], _ outputs: [epCombineOutputs_t], _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?) throws
    /// The stacked calls (StackedEntryPoints.swift).
    func dispatchStacked(_ call: StackedDispatch, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws
    func combineStacked(_ call: StackedCombine, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws
    /// Waits for the group's work and throws the first error recorded where the work ran.
    func checkStatus() throws
    /// What `rank` received in the last collective dispatch.
    func layoutInfo(rank: Int) throws -> LayoutInfo
    func activeRanks() throws -> RankMask
    func deactivate(rank: Int) throws
    func clean(ranks: RankMask) throws
    /// The per-rank calls of `rank` (a handle's), or an error when the group offers none for it.
    func rankCalls(rank: Int) throws -> any RankCalls
    /// A new step for the group calls (and the NCCL rank's per-rank calls). Control path.
    func makeStep() throws -> any StepHandle
    /// What `rank` received in `step`'s last dispatch.
    func layoutInfo(step: any StepHandle, rank: Int) throws -> LayoutInfo
    /// Enqueues the second half of the last send-only collective call.
    func complete(_ stream: UnsafeMutableRawPointer?) throws
    /// Buffer slots of group-owned receive buffers (NCCL-rank groups); 0 for the others.
    var bufferSlots: Int { get }
    /// Where the group's tensors live.
    var location: MemoryLocation { get }
    /// SMs the group's kernels may use (GPU groups); 0 for the host.
    var multiprocessors: Int { get }
    /// A group-owned buffer of buffer slot `slot` (NCCL-rank groups only).
    func buffer(slot: Int, _ kind: epBuffer_t) throws -> TensorRef
    /// Copies the received zones of `step`'s dispatch (nil: the group's own step) out of the
    /// buffer slot it used into `tokens` (NCCL-rank groups only).
    func copyReceived(step: (any StepHandle)?, into tokens: TensorRef, _ stream: UnsafeMutableRawPointer?) throws
}

extension GroupBackend {
    var bufferSlots: Int { 0 }

    func buffer(slot: Int, _ kind: epBuffer_t) throws -> TensorRef {
        throw UnsupportedCall(message: "only NCCL-rank groups own receive buffers; the host and virtual GPU groups receive into the caller's tensors")
    }

    func copyReceived(step: (any StepHandle)?, into tokens: TensorRef, _ stream: UnsafeMutableRawPointer?) throws {
        throw UnsupportedCall(message: "only NCCL-rank groups receive into buffer slots; the host and virtual GPU groups receive into the caller's tensors (outputs) directly")
    }
}

/// What an `epGroup_t` points at: a group of R ranks on one backend.
final class GroupObject: @unchecked Sendable {
    let config: GroupConfig
    private let backend: any GroupBackend
    /// Serialises the group calls (not the per-rank calls, which wait for each other).
    private let lock = NSLock()

    init(config: GroupConfig, backend: any GroupBackend) {
        self.config = config
        self.backend = backend
    }

    var backendKind: epBackend_t { backend.kind }

    /// How the errors the group's status reports (the device's routing errors, a peer's reason)
    /// name the routing the callers gave: as the collective calls' arrays (`inputs[r].topkIdx`),
    /// an NCCL rank's as epHandleUpdate's struct (`inputs.topkIdx`), the one update it has.
    var statusNames: CNames { backend.kind == epBackendNCCLRank ? .update : .collective }

    /// Runs `body` on the backend, serialised with the group's other calls.
    /// Where the group's tensors live.
    var location: MemoryLocation { backend.location }

    func withBackend<T>(_ body: (any GroupBackend) throws -> T) throws -> T {
        try lock.withLock { try body(backend) }
    }

    /// Runs a handle's call: serialised with the group's calls, unless the call waits for the
    /// other ranks' calls in this process (host ranks on their threads), which the lock would block.
    func withRank<T>(_ calls: any RankCalls, _ body: (any RankCalls) throws -> T) throws -> T {
        if calls.waitsForPeers { return try body(calls) }
        return try lock.withLock { try body(calls) }
    }

    func checkRank(_ rank: Int32, _ name: String = "rank") throws(EPError) -> Int {
        guard rank >= 0, Int(rank) < config.ranks else {
            throw .invalidArgument(field: name, value: "\(rank)", requirement: "must be in 0..<\(config.ranks)")
        }
        return Int(rank)
    }
}

/// The host group and the handle of its group calls' current step.
final class HostBackend: @unchecked Sendable {
    let group: HostGroup
    let handle: HostGroupHandle
    /// Each rank's tokens in the handle's step; nil until an update succeeds, and after one fails.
    var stepTokens: [Int]?
    /// What each rank received in the last collective dispatch.
    var lastLayout: [LayoutInfo?]

    init(_ group: HostGroup) throws(EPError) {
        self.group = group
        handle = try group.makeHandle()
        lastLayout = Array(repeating: nil, count: group.config.ranks)
    }
}

/// The virtual GPU group, the handle of its group calls' current step, and the caller streams
/// its calls were enqueued on since the last wait for them.
final class GPUBackend: @unchecked Sendable {
    let group: VirtualGPUGroup
    let handle: GPUStepHandle
    var callerStreams: [CUDAStream] = []
    let descriptors: DescriptorCache?

    init(_ group: VirtualGPUGroup) throws(EPError) {
        self.group = group
        handle = try group.makeHandle()
        descriptors = DescriptorCache(ranks: group.config.ranks)
    }

    deinit { handle.release() }   // while the group that waits for its work is still here
}

/// Devices opened by GPU groups, one per ordinal, shared by the groups on it.
final class DeviceCache: @unchecked Sendable {
    private let lock = NSLock()
    private var devices: [Int: GPUDevice] = [:]

    static let shared = DeviceCache()

    func device(_ ordinal: Int) throws(EPError) -> GPUDevice {
        lock.lock()
        defer { lock.unlock() }
        if let device = devices[ordinal] { return device }
        let device = try GPUDevice(ordinal: ordinal)
        devices[ordinal] = device
        return device
    }
}
