import CExpertParallel
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU

/// The collective calls on the virtual GPU group: one launch for all R ranks on the caller's
/// stream, no host synchronisation (except where the caller asks for layout info).
extension GPUBackend: GroupBackend {
    var config: GroupConfig { group.config }
    var kind: epBackend_t { epBackendVirtualGPU }

    /// The caller's stream; NULL is CUDA's default (legacy) stream, as in CUDA's own calls.
    func stream(_ raw: UnsafeMutableRawPointer?) -> CUDAStream {
        let stream = CUDAStream(rawValue: OpaquePointer(raw))
        if !callerStreams.contains(stream) { callerStreams.append(stream) }
        return stream
    }

    func updateAll(_ inputs: [epUpdateInputs_t], _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        var routing: [TensorRef] = []
        for r in 0..<config.ranks { routing.append(try TensorDescriptor.tensor(inputs[r].topkIdx, "inputs[\(r)].topkIdx")) }
        try group.update(topkIdx: routing, stream: self.stream(stream), mode: settings.mode)
    }

    func dispatchAll(
        _ inputs: [epDispatchInputs_t], _ outputs: [epDispatchOutputs_t], _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        var ins: [DispatchInput] = [], outs: [DispatchOutput] = [], destinations: [LayoutInfoDestination?] = []
        for r in 0..<config.ranks {
            ins.append(try DispatchInput(inputs[r], "inputs[\(r)]"))
            outs.append(try DispatchOutput(outputs[r], "outputs[\(r)]"))
            destinations.append(try LayoutInfoDestination(outputs[r].layoutInfo, "outputs[\(r)].layoutInfo"))
        }
        try group.dispatch(ins, into: outs, stream: self.stream(stream), mode: settings.mode)
        guard destinations.contains(where: { $0 != nil }) else { return }
        try checkStatus()
        for (r, destination) in destinations.enumerated() {
            if let destination { destination.fill(try group.layoutInfo(rank: r)) }
        }
    }

    func combineAll(
        _ inputs: [epCombineInputs_t], _ outputs: [epCombineOutputs_t], _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        var ins: [CombineInput] = [], outs: [CombineOutput] = []
        for r in 0..<config.ranks {
            ins.append(try CombineInput(inputs[r], "inputs[\(r)]"))
            outs.append(try CombineOutput(outputs[r], "outputs[\(r)]"))
        }
        try group.combine(ins, into: outs, direction: settings.direction, stream: self.stream(stream), mode: settings.mode)
    }

    /// Waits for the caller streams used since the last check, then reads the device status.
    func checkStatus() throws(EPError) {
        try synchronizeCallerStreams()
        try group.checkStatus()
    }

    func layoutInfo(rank: Int) throws -> LayoutInfo {
        try checkStatus()
        return try group.layoutInfo(rank: rank)
    }

    func activeRanks() throws -> RankMask {
        try synchronizeCallerStreams()
        return try group.activeRanks
    }

    func deactivate(rank: Int) throws {
        try synchronizeCallerStreams()
        try group.deactivate(rank: rank)
    }

    func clean(ranks: RankMask) throws {
        try synchronizeCallerStreams()
        try group.clean(ranks: ranks)
    }

    func rankCalls(rank: Int) throws -> any RankCalls {
        throw UnsupportedCall(message: "a virtual GPU group runs all its ranks in one launch and has no per-rank calls; use epGroupUpdateAll, epGroupDispatchAll and epGroupCombineAll")
    }

    func synchronizeCallerStreams() throws(EPError) {
        try group.device.makeCurrent()
        for stream in callerStreams {
            do { try group.device.driver.synchronize(stream) } catch { throw .backend("\(error)") }
        }
        callerStreams.removeAll()
    }
}
