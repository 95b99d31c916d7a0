import ExpertParallel
import ExpertParallelCUDA

/// The stacked calls (StackedCall.swift): every rank's argument one part of one array, so a call
/// checks one description per argument and computes each rank's address, instead of converting
/// and checking one tensor per rank and argument. The host cost of a PyTorch step.
extension VirtualGPUGroup {
    /// With `call.topkIdx`: `handle`'s update and its dispatch, one call; without: a dispatch of
    /// `handle`'s step again (the backward pass), `call.tokens` its rows per rank. Every argument
    /// is checked first: a rejected call runs nothing and leaves the step as it was (as on the host).
    public func dispatch(
        _ handle: GPUStepHandle, stacked call: StackedDispatch, direction: PassDirection = .forward, options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkNothingPending()
        var stepTokens: Int?, step: GPUStepHandle.Step?
        if call.topkIdx == nil {
            step = try handle.currentStep()
            let routing = step!.routing
            stepTokens = routing[0].tokens
            if let other = routing.first(where: { $0.tokens != routing[0].tokens }) {
                throw .invalidArgument(field: "topkIdx", value: "nil", requirement:
                    "must be given: the step's ranks have different token counts (\(routing[0].tokens), \(other.tokens)), which a stacked call cannot send again")
            }
        }
        let checked = try CheckedStackedDispatch(call, shapes: engine.shapes, location: location, stepTokens: stepTokens)
        if let step { try checked.refuseOverlaps(routingBytes(step.routing, indexBytes: step.indexBytes), parts: config.ranks) }
        // Local functions, not closure constants: passed as non-escaping arguments, they need no
        // heap context (a copy of `checked`, its references retained) per call.
        func sources(_ i: Int) -> SendSide {
            SendSide(tokens: checked.address(.inputs, rank: i), weights: checked.address(.topkWeights, rank: i),
                     scales: checked.address(.scales, rank: i), counts: checked.address(.expertCounts, rank: i),
                     sourceCounts: checked.address(.expertSourceCounts, rank: i))
        }
        func received(_ r: Int) -> ReceiveBuffers {
            ReceiveBuffers(rows: checked.address(.received, rank: r), indices: checked.address(.receivedTopkIdx, rank: r),
                           weights: checked.address(.receivedTopkWeights, rank: r), scales: checked.address(.receivedScales, rank: r))
        }
        let receivedIndexBytes = call.receivedTopkIdx?.dtype.byteSize ?? 4
        let vectorBytes = engine.vectorBytes(stacked: [(call.inputs.address, checked.stride(.inputs)), (call.received.address, checked.stride(.received))])
        guard let idx = call.topkIdx else {
            try engine.dispatch(handle, sources: sources, received: received, receivedIndexBytes: receivedIndexBytes, vectorBytes: vectorBytes,
                                options: options)
            return
        }
        let routing = (0..<config.ranks).map { RoutingRows(address: checked.address(.topkIdx, rank: $0), tokens: call.tokens) }
        try engine.updateAndDispatch(handle, routing: routing, indexBytes: idx.dtype.byteSize, sources: sources, received: received,
                                     receivedIndexBytes: receivedIndexBytes, vectorBytes: vectorBytes, options: options)
    }

    /// The combine of `handle`'s dispatched step: rank r's rows (as many as its routing has) go
    /// to part r of `call.combined`.
    public func combine(
        _ handle: GPUStepHandle, stacked call: StackedCombine, direction: PassDirection = .forward, options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkNothingPending()
        let step = try handle.dispatchedStep()
        let checked = try CheckedStackedCombine(call, stepTokens: step.routing.map(\.tokens), direction: direction, shapes: engine.shapes,
                                                location: location)
        try checked.refuseOverlaps(routingBytes(step.routing, indexBytes: step.indexBytes))
        try engine.combine(
            handle,
            into: { i in CombineTarget(tokens: checked.address(.combined, rank: i), weightGradients: checked.address(.topkWeightGradients, rank: i)) },
            experts: { r in
                ExpertSide(rows: checked.address(.expertOutputs, rank: r), weights: checked.address(.topkWeights, rank: r),
                           weightGradients: checked.address(.weightGradients, rank: r))
            },
            direction: direction,
            vectorBytes: engine.vectorBytes(stacked: [(call.expertOutputs.address, checked.stride(.expertOutputs)),
                                                      (call.combined.address, checked.stride(.combined))]),
            options: options)
    }
}

extension StepEngine {
    /// `vectorBytes` for stacked arrays: rank r's part of each is at address + r × stride, so
    /// all are 16-byte aligned when every address and stride is.
    func vectorBytes(stacked arrays: [(address: UInt64, stride: Int)]) -> Int {
        vectorBytes(arrays.lazy.map(\.address), arrays.lazy.map { UInt64($0.stride) })
    }
}
