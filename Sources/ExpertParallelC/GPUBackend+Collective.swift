import CExpertParallel
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU

/// The virtual GPU group under the generic group calls (StepGroupCalls.swift): one launch for
/// all R ranks on the caller's stream, no host synchronisation except where the caller asks for
/// status, layout info or the mask. What differs: those first wait for the caller streams used
/// since (the group's own `checkStatus` waits only for its own streams).
extension GPUBackend: StepGroupBackend {
    var kind: epBackend_t { epBackendVirtualGPU }

    func stepHandle() -> GPUStepHandle { handle }

    var location: MemoryLocation { .device(group.device.ordinal) }

    var multiprocessors: Int { group.multiprocessors }

    /// On the caller's stream, remembered until the next `settle()`.
    func options(_ settings: CallSettings, _ raw: UnsafeMutableRawPointer?) -> CallOptions {
        let stream = CUDAStream(rawValue: OpaquePointer(raw))
        if !callerStreams.contains(stream) { callerStreams.append(stream) }
        return CallOptions(stream, phase: settings.phase, mode: settings.mode)
    }

    /// Waits for the caller streams used since the last wait.
    func settle() throws {
        try group.device.makeCurrent()
        for stream in callerStreams {
            do { try group.device.driver.synchronize(stream) } catch { throw EPError.backend("\(error)") }
        }
        callerStreams.removeAll()
    }

    /// The engine's own stacked calls: no per-rank tensors at all.
    func dispatchStacked(_ call: StackedDispatch, _ settings: CallSettings, _ raw: UnsafeMutableRawPointer?) throws {
        try group.dispatch(try handle(settings), stacked: call, direction: settings.direction, options: options(settings, raw))
    }

    func combineStacked(_ call: StackedCombine, _ settings: CallSettings, _ raw: UnsafeMutableRawPointer?) throws {
        try group.combine(try handle(settings), stacked: call, direction: settings.direction, options: options(settings, raw))
    }

    func rankCalls(rank: Int) throws -> any RankCalls {
        throw UnsupportedCall(message: "a virtual GPU group runs all its ranks in one launch and has no per-rank calls; use epGroupUpdateAll, epGroupDispatchAll and epGroupCombineAll")
    }
}
