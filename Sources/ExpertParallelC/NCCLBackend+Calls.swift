import CExpertParallel
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU

/// The NCCL-rank group under the generic group calls (StepGroupCalls.swift): they answer for
/// this process's rank. What differs: the collective calls, which need every rank's tensors in
/// one process, are not offered; layout info is that of the per-rank calls' step; the mask is
/// its peers' to change.
extension NCCLBackend: StepGroupBackend {
    var kind: epBackend_t { epBackendNCCLRank }

    /// No collective calls, so no handle for them: the per-rank calls below use the group's own.
    func stepHandle() throws -> GPUStepHandle {
        throw UnsupportedCall(message: "an NCCL-rank group holds one rank per process and has no collective calls; make a handle for this process's rank (epHandleCreate(group, \(rank), ...)) and use epHandleUpdate, epDispatch and epCombine")
    }

    /// What this rank received in the per-rank calls' last dispatch.
    func layoutInfo(rank: Int) throws -> LayoutInfo {
        try requireOwn(rank, "rank")
        try checkStatus()
        return try group.layoutInfo()
    }

    func deactivate(rank: Int) throws {
        throw UnsupportedCall(message: "an NCCL-rank group does not offer epGroupDeactivateRank yet; a rank that times out is masked by its peers")
    }

    func clean(ranks: RankMask) throws {
        throw UnsupportedCall(message: "an NCCL-rank group does not offer epGroupCleanRanks yet")
    }

    func rankCalls(rank: Int) throws -> any RankCalls {
        try requireOwn(rank, "rank")
        return self
    }

    private func requireOwn(_ rank: Int, _ name: String) throws(EPError) {
        guard rank == self.rank else {
            throw .invalidArgument(field: name, value: "\(rank)", requirement: "must be this process's rank (\(self.rank)): an NCCL-rank group holds only its own rank")
        }
    }
}

/// This process's rank's calls: they enqueue on the caller's stream and return. Dispatch copies
/// the group's receive buffers into the caller's outputs; combine copies the caller's expert
/// outputs into the buffers the other ranks read (NCCLRankGroup+CallerTensors.swift).
extension NCCLBackend: RankCalls {
    var waitsForPeers: Bool { false }

    /// A refused call launches nothing; the peers' matching call is bounded by the timeout.
    func refuse(_ call: HostRank.RefusedCall, _ error: any Error) {}

    /// The caller's stream; NULL is CUDA's default (legacy) stream, as in CUDA's own calls.
    private func stream(_ raw: UnsafeMutableRawPointer?) -> CUDAStream { CUDAStream(rawValue: OpaquePointer(raw)) }

    func update(_ inputs: epUpdateInputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        try group.update(topkIdx: try TensorDescriptor.tensor(inputs.topkIdx, "inputs.topkIdx"), stream: self.stream(stream))
    }

    func dispatch(
        _ inputs: epDispatchInputs_t, _ outputs: epDispatchOutputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        let input = try DispatchInput(inputs, "inputs"), output = try DispatchOutput(outputs, "outputs")
        let destination = try LayoutInfoDestination(outputs.layoutInfo, "outputs.layoutInfo")
        let group = try self.group
        try group.dispatch(input, copyingInto: output, stream: self.stream(stream))
        guard let destination else { return }
        try group.checkStatus()
        destination.fill(try group.layoutInfo())
    }

    func combine(
        _ inputs: epCombineInputs_t, _ outputs: epCombineOutputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        let input = try CombineInput(inputs, "inputs"), output = try CombineOutput(outputs, "outputs")
        try group.combine(copyingFrom: input, into: output, direction: settings.direction, stream: self.stream(stream))
    }
}
