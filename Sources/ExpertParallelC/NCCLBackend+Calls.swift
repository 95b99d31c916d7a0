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

    var multiprocessors: Int { (try? group.multiprocessors) ?? 0 }

    var bufferSlots: Int { (try? group.bufferSlots) ?? 0 }

    /// This rank's group-owned buffer `kind` of slot `slot`.
    func buffer(slot: Int, _ kind: epBuffer_t) throws -> TensorRef {
        let group = try self.group
        guard slot >= 0, slot < group.bufferSlots else {
            throw EPError.invalidArgument(field: "slot", value: "\(slot)", requirement: "must be in 0..<\(group.bufferSlots) (epGroupInfo_t.bufferSlots)")
        }
        let buffers = group.slots[slot]
        let found: TensorRef? = switch kind {
        case epBufferReceivedTokens: buffers.receivedTokens
        case epBufferReceivedTopkIdx: buffers.receivedIndices
        case epBufferReceivedTopkWeights: buffers.receivedWeights
        case epBufferExpertOutputs: buffers.expertOutputs
        case epBufferWeightGradients: buffers.weightGradients
        case epBufferReceivedScales: buffers.receivedScales
        default:
            throw EPError.invalidArgument(
                field: "buffer", value: "\(kind.rawValue)",
                requirement: "must be epBufferReceivedTokens (0), epBufferReceivedTopkIdx (1), epBufferReceivedTopkWeights (2), epBufferExpertOutputs (3), epBufferWeightGradients (4) or epBufferReceivedScales (5)")
        }
        guard let found else {
            throw EPError.invalidArgument(field: "buffer", value: "\(kind.rawValue)", requirement: "names a buffer this group's algorithm and layout do not have")
        }
        return found
    }

    /// The received zones of `step`'s dispatch (nil: the group's own) out of its buffer slot.
    func copyReceived(step: (any StepHandle)?, into tokens: TensorRef, _ stream: UnsafeMutableRawPointer?) throws {
        let group = try self.group
        let handle = try step.map { try self.handle(of: $0) } ?? group.implicitHandle
        try group.copyReceived(handle, into: tokens, stream: self.stream(stream))
    }

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

/// This process's rank's calls: they enqueue on the caller's stream and return. A dispatch into a
/// slot's own receive buffers (epGroupGetBuffer) and a combine from its own expert-output buffer
/// copy nothing; otherwise dispatch copies the group's receive buffers into the caller's outputs
/// and combine copies the caller's expert outputs into the buffers the other ranks read
/// (NCCLRankGroup+CallerTensors.swift).
extension NCCLBackend: RankCalls {
    var waitsForPeers: Bool { false }

    /// A refused call launches nothing; the peers' matching call is bounded by the timeout.
    func refuse(_ call: HostRank.RefusedCall, _ error: any Error) {}

    /// The caller's stream; NULL is CUDA's default (legacy) stream, as in CUDA's own calls.
    private func stream(_ raw: UnsafeMutableRawPointer?) -> CUDAStream { CUDAStream(rawValue: OpaquePointer(raw)) }

    /// The step the config names, or the group's own.
    private func step(_ settings: CallSettings) throws -> GPUStepHandle {
        guard let step = settings.step else { return try group.implicitHandle }
        return try handle(of: step.handle)
    }

    func update(_ inputs: epUpdateInputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        let topkIdx = try TensorDescriptor.tensor(inputs.topkIdx, "inputs.topkIdx")
        try group.update(try step(settings), topkIdx: [topkIdx], options: .init(self.stream(stream)))
    }

    func dispatch(
        _ inputs: epDispatchInputs_t, _ outputs: epDispatchOutputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        let group = try self.group, handle = try step(settings)
        let input = try DispatchInput(inputs, "inputs"), output = try DispatchOutput(outputs, "outputs")
        let destination = try LayoutInfoDestination(outputs.layoutInfo, "outputs.layoutInfo")
        let options = CallOptions(self.stream(stream), phase: settings.phase)
        try group.refuseUnused(output)   // before the slot checks: the same words as every backend's
        if let slot = group.slot(receiving: output) {
            // Zero copy: the received routing goes to the slot's own buffers too.
            let own = group.slots[slot]
            for (given, buffer, name) in [(output.topkIdx, own.receivedIndices, "topkIdx"), (output.topkWeights, own.receivedWeights, "topkWeights"),
                                          (output.scales, own.receivedScales, "scales")] {
                guard let given, given.address != buffer?.address else { continue }
                throw EPError.invalidArgument(
                    field: "outputs.\(name)", value: "\(given.address.map { "\($0)" } ?? "NULL")",
                    requirement: "must be slot \(slot)'s own received \(name) buffer (epGroupGetBuffer) or NULL, as outputs.tokens is that slot's")
            }
            try group.dispatch(handle, [input], slot: slot, counts: output, options: options)
        } else {
            guard settings.phase == .whole else {
                throw EPError.invalidArgument(
                    field: "config.phase", value: "epPhaseSendOnly",
                    requirement: "needs outputs in a buffer slot's own receive buffers (epGroupGetBuffer): a copy into the caller's tensors must wait for the data")
            }
            try group.dispatch(input, copyingInto: output, handle: handle, slot: 0, stream: self.stream(stream))
        }
        guard let destination else { return }
        try group.checkStatus()
        destination.fill(try group.layoutInfo(handle, rank: rank))
    }

    func combine(
        _ inputs: epCombineInputs_t, _ outputs: epCombineOutputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        let group = try self.group, handle = try step(settings)
        let input = try CombineInput(inputs, "inputs"), output = try CombineOutput(outputs, "outputs")
        if let slot = handle.bufferSlot, input.expertOutputs.address == group.slots[slot].expertOutputs.address {
            try group.combine(handle, [input], into: [output], direction: settings.direction,
                              options: CallOptions(self.stream(stream), phase: settings.phase))
            return
        }
        try group.combine(copyingFrom: input, into: output, handle: handle, direction: settings.direction, phase: settings.phase,
                          stream: self.stream(stream))
    }

    func complete(_ stream: UnsafeMutableRawPointer?) throws {
        try group.complete(stream: self.stream(stream))
    }

    /// The stacked calls (v7): one part, this rank's; the step the call names, or the per-rank
    /// calls' own. The launch mode is not read (an NCCL rank's calls are single launches).
    func dispatchStacked(_ call: StackedDispatch, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        let group = try self.group, handle = try step(settings)
        try group.dispatch(handle, stacked: call, direction: settings.direction, options: CallOptions(self.stream(stream), phase: settings.phase))
    }

    func combineStacked(_ call: StackedCombine, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        let group = try self.group, handle = try step(settings)
        try group.combine(handle, stacked: call, direction: settings.direction, options: CallOptions(self.stream(stream), phase: settings.phase))
    }
}
