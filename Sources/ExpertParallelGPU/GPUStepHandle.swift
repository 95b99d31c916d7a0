import ExpertParallel
import ExpertParallelCUDA
import Foundation

/// One local rank's routing as the kernels read it: where its `[B, K]` expert ids are, and B.
struct RoutingRows {
    var address: UInt64
    var tokens: Int
}

/// One step on a GPU group: the routing of one update and, in device memory of its own, what
/// the update derived from it for each of the group's local ranks (slots, counts, layout: the
/// `H_*` words of ep_step.cuh, a few KB per rank). The row buffers stay the group's, so many
/// handles can be live at once: one per MoE layer, micro-batch or pass. Freed by `release()` or
/// on deinit.
public final class GPUStepHandle: StepHandle, @unchecked Sendable {
    /// Bytes of device memory this handle holds (all its local ranks).
    public let deviceBytes: Int
    let device: GPUDevice
    let localRanks: [Int]
    let stride: Int
    private let lock = NSLock()
    private var memory: DevicePointer?
    private var step: Step?
    /// The NCCL group's buffer slot this step's rows went to (its combine reads that slot).
    private var slot: Int?
    private var dispatched = false

    /// What the last accepted update of this handle was given (host side).
    struct Step {
        /// Each local rank's routing, which must stay unchanged until the step's last combine.
        var routing: [RoutingRows]
        var indexBytes: Int
        var maxTokens: Int {
            var most = 0
            for idx in routing { most = max(most, idx.tokens) }
            return most
        }
    }

    /// Waits for the group's work that may still read the handle's words.
    private let synchronize: () throws(EPError) -> Void

    init(device: GPUDevice, localRanks: [Int], workspace: StepWorkspace, synchronize: @escaping () throws(EPError) -> Void) throws(EPError) {
        self.device = device
        self.synchronize = synchronize
        self.localRanks = localRanks
        stride = workspace.handleStride
        deviceBytes = stride * localRanks.count
        try device.makeCurrent()
        memory = try device.allocateZeroed(byteCount: deviceBytes)
    }

    deinit { release() }

    /// Frees the handle's device memory once the group's work is done (if that wait fails, the
    /// memory is left allocated rather than freed under running kernels); later calls with it
    /// fail with `wrongOrder`.
    public func release() {
        let freed: DevicePointer? = lock.withLock {
            defer { memory = nil; step = nil }
            return memory
        }
        guard let freed else { return }
        do {
            try synchronize()
            try device.makeCurrent()
        } catch { return }
        try? device.driver.free(freed)
    }

    public var isReleased: Bool { lock.withLock { memory == nil } }

    /// The device address of the first local rank's words; local rank i's are `stride` × i after.
    func base() throws(EPError) -> DevicePointer {
        lock.lock()
        defer { lock.unlock() }
        guard let memory else { throw Self.released }
        return memory
    }

    /// Local rank `rank`'s words (device address), for the argument block.
    func words(rank: Int) throws(EPError) -> DevicePointer {
        guard let base = lock.withLock({ memory }) else { throw Self.released }
        guard let index = localRanks.firstIndex(of: rank) else {
            throw .invalidArgument(field: "rank", value: "\(rank)", requirement: "must be one of this group's local ranks \(localRanks)")
        }
        return base.advanced(by: index * stride)
    }

    /// The step of the last accepted update; dispatch and combine need one.
    func currentStep() throws(EPError) -> Step {
        lock.lock()
        defer { lock.unlock() }
        guard memory != nil else { throw Self.released }
        guard let step else { throw .wrongOrder("dispatch and combine need this handle updated with the step's topkIdx first") }
        return step
    }

    /// A new step (or none): it has no dispatch, so no buffer slot, yet.
    func setStep(_ new: Step?) {
        lock.withLock {
            step = new
            slot = nil
            dispatched = false
        }
    }

    /// Its step's rows went out (into buffer slot `slot`, for an NCCL group): combine may follow.
    func setDispatched(slot new: Int? = nil) {
        lock.withLock {
            dispatched = true
            if let new { slot = new }
        }
    }
    public var bufferSlot: Int? { lock.withLock { slot } }

    /// The step of the last accepted update, which must have been dispatched (combine brings
    /// back what a dispatch sent: without one, its rows would be another step's or none).
    func dispatchedStep() throws(EPError) -> Step {
        let step = try currentStep()
        guard lock.withLock({ dispatched }) else { throw .wrongOrder("combine needs a dispatch of this handle's step first") }
        return step
    }

    static let released = EPError.wrongOrder("this handle was released; make a new one")
}
