import ExpertParallel
import ExpertParallelCUDA

// Dispatch and combine with the caller's own tensors, as the C ABI and Python offer them: the
// group's shared buffers (which the other ranks write and read) are copied out of and into on
// the call's stream, so a caller never holds a buffer that a peer may change under it.

extension NCCLRankGroup {
    /// The buffer slot whose received rows are `output.tokens` (a zero-copy dispatch), if any.
    public func slot(receiving output: DispatchOutput) -> Int? {
        slots.firstIndex { $0.receivedTokens.address == output.tokens.address }
    }

    /// `dispatch` of `handle`'s step (nil: the group's own) into buffer slot `slot`, then, on
    /// `stream`, fills `output.tokens` (shaped and typed like `dispatchOutput`: `receiveShape`
    /// rows) with zeros and copies the received zones into it (`copyReceived`: not the whole
    /// worst-case buffer), and copies the slot's whole received routing (int32 local ids, float32
    /// weights) into `output` and zeroes it for the next step; so rows outside the received
    /// zones read as zero. FP8 rows and scales are copied whole and zeroed, as the routing is.
    ///
    /// Zeroing is safe here: the dispatch ends once every peer has written its rows here, and a
    /// peer writes this slot again only in a later dispatch into it, which comes after a call of
    /// this rank's that the peer waits for and this stream runs after the zeroing: this step's
    /// combine (its end waits for every rank), the next step's update (its counts), or, with two
    /// slots or more, the dispatch into the other slot (its end waits for every rank's).
    public func dispatch(
        _ input: DispatchInput, copyingInto output: DispatchOutput, handle: GPUStepHandle? = nil, slot: Int = 0,
        stream: CUDAStream? = nil
    ) throws(EPError) {
        try refuseUnused(output)
        try TensorCheck.require(output.tokens, "output.tokens", dtypes: [config.receiveElementType], shape: config.receiveShape, location: here)
        // Element rows are copied in 8- or 16-byte vectors, and only the received zones: a
        // whole-buffer copy (which an unaligned tensor would need) would bring the rows earlier
        // steps left in the slot outside them. (FP8 rows are copied whole, the slot cleared.)
        if config.fp8 == nil { try requireAligned(output.tokens, "output.tokens", 8) }
        if let fp8 = config.fp8, let scalesShape = config.receiveScalesShape {
            try TensorCheck.require(output.scales, "output.scales", dtypes: [fp8.scaleType], shape: scalesShape, location: here)
        }
        if let routingShape = config.receiveRoutingShape {
            try TensorCheck.require(output.topkIdx, "output.topkIdx", dtypes: [.i32], shape: routingShape, location: here)
            try TensorCheck.require(output.topkWeights, "output.topkWeights", dtypes: [.f32], shape: routingShape, location: here)
        }
        let handle = handle ?? implicitHandle
        try dispatch(handle, [input], slot: slot, counts: output, options: .init(stream))
        let stream = stream ?? self.stream, buffers = slots[slot]
        if config.fp8 == nil {
            try clear(output.tokens, stream: stream)
            try copyZones(handle, from: buffers.receivedTokens, to: output.tokens, stream: stream)
        } else {
            try copy(buffers.receivedTokens, to: output.tokens, stream: stream)
            try clear(buffers.receivedTokens, stream: stream)
        }
        if let scales = buffers.receivedScales, let outScales = output.scales {
            try copy(scales, to: outScales, stream: stream)
            try clear(scales, stream: stream)
        }
        if let indices = buffers.receivedIndices, let weights = buffers.receivedWeights,
           let outIndices = output.topkIdx, let outWeights = output.topkWeights {
            try copy(indices, to: outIndices, stream: stream)
            try copy(weights, to: outWeights, stream: stream)
            try clear(indices, stream: stream)
            try clear(weights, stream: stream)
        }
    }

    /// Copies the rows `handle`'s dispatch received (nil: the group's own step's), the layout's
    /// zones with their padding (the rows a combine reads), out of the buffer slot that dispatch
    /// used into `tokens` (shaped and typed like the slot's received tokens), on `stream`; rows
    /// outside the zones are not touched. What a caller that keeps the received rows past the
    /// slot's reuse (an autograd graph) copies, instead of the whole worst-case buffer (ll-std
    /// at one rank: ~15 MB of 470 MB). Refused for FP8 groups (their e4m3 rows and scales are
    /// not element rows), for `tokens` not 8-byte aligned (the copy moves 8- or 16-byte vectors)
    /// and while a send-only call waits for `complete()`. A step that failed on the device (its
    /// update found invalid routing or an overflow) copies nothing: `tokens` is left as it was.
    public func copyReceived(_ handle: GPUStepHandle? = nil, into tokens: TensorRef, stream: CUDAStream? = nil) throws(EPError) {
        let handle = handle ?? implicitHandle
        guard config.fp8 == nil else {   // (first: an FP8 group's e4m3 `tokens` would pass the checks below only to be refused here)
            throw .invalidArgument(
                field: "group", value: "an FP8 group", requirement: "must dispatch element rows (bf16, f16, f32) for copyReceived; an FP8 group's e4m3 rows come with scales")
        }
        _ = try handle.currentStep()
        let slot = try slotOfDispatch(handle, for: "copyReceived")
        try engine.checkNothingPending()   // (a send-only dispatch's rows are not all here before its complete())
        try TensorCheck.require(tokens, "tokens", dtypes: [config.receiveElementType], shape: config.receiveShape, location: here)
        // The copy kernel loads and stores 8- or 16-byte vectors: a view at an odd element would
        // fault on the device (a sticky error that ends the context), so it is refused here.
        try requireAligned(tokens, "tokens", 8)
        try copyZones(handle, from: slots[slot].receivedTokens, to: tokens, stream: stream ?? self.stream)
    }

    /// Copies the rows of the caller's `input.expertOutputs` that the step received (the rows
    /// the peers read; the others are not read and not copied), and, for HT expert-major
    /// forward, the per-slot `topkWeights`, for HT backward the `weightGradients`, into the
    /// group's shared buffers of the slot `handle`'s dispatch used (nil: the group's own step)
    /// on `stream`, then combines from them.
    ///
    /// The other ranks read those buffers only after this rank's combine announces them ready,
    /// and the previous step's readers are done before this rank's previous combine returned.
    ///
    /// With `phase: .sendOnly` the copies go on the stream before the send-only half (the peers
    /// read after it), and `complete()` reduces; per-slot weights that are not the slot's own
    /// are refused there, as they would have to be cleared before the peers are done with them.
    public func combine(
        copyingFrom input: CombineInput, into output: CombineOutput, handle: GPUStepHandle? = nil,
        direction: PassDirection = .forward, phase: CallPhase = .whole, stream: CUDAStream? = nil
    ) throws(EPError) {
        let handle = handle ?? implicitHandle
        try TensorCheck.require(input.expertOutputs, "input.expertOutputs", dtypes: [config.elementType], shape: config.receiveShape, location: here)
        _ = try handle.dispatchedStep()
        let slot = try slotOfDispatch(handle)
        let buffers = slots[slot]
        var shared = CombineInput(expertOutputs: buffers.expertOutputs, topkWeights: input.topkWeights, weightGradients: input.weightGradients)
        var copies: [(from: TensorRef, to: TensorRef)] = []
        if config.isExpertMajorHT, direction == .forward, let weights = buffers.receivedWeights {
            try TensorCheck.require(input.topkWeights, "input.topkWeights", dtypes: [.f32], shape: weights.shape, location: here)
            shared.topkWeights = weights
            if let given = input.topkWeights, given.address != weights.address {
                guard phase == .whole else {
                    throw .invalidArgument(
                        field: "input.topkWeights", value: "\(address(given))",
                        requirement: "must be slots[\(slot)].receivedWeights as a dispatch into that slot's own buffers left them, for a send-only combine: a copy would have to be cleared before the peers have read it")
                }
                copies.append((given, weights))
            }
        }
        if config.algorithm == .highThroughput, direction == .backward, let gradients = buffers.weightGradients {
            try TensorCheck.require(input.weightGradients, "input.weightGradients", dtypes: [.f32], shape: gradients.shape, location: here)
            shared.weightGradients = gradients
            if let given = input.weightGradients { copies.append((given, gradients)) }
        }
        // Every check before anything is copied: a pending send-only half may have peers reading
        // these buffers, and a call refused for its output must leave them as they were.
        _ = try checkCombine(handle, shared, output, direction: direction)
        let stream = stream ?? self.stream
        // The expert outputs: only the rows this step received, which are all the peers read
        // (the buffer is sized for the worst case: at one rank of ll-std 470 MB against 15 MB);
        // a tensor that is not 8-byte aligned (a view at an odd element) is copied whole.
        if !copiesZones(input.expertOutputs) {
            copies.append((input.expertOutputs, buffers.expertOutputs))
        } else if address(input.expertOutputs) != address(buffers.expertOutputs) {
            try copyZones(handle, from: input.expertOutputs, to: buffers.expertOutputs, stream: stream)
        }
        for (from, to) in copies where from.address != to.address { try copy(from, to: to, stream: stream) }
        try enqueueCombine(handle, shared, output, slot: slot, direction: direction, options: .init(stream, phase: phase))
        // The per-slot weights share the buffer that the next dispatch delivers weights into, and
        // whose slots it does not write read back as zero: clear what was copied in. The combine
        // returns only once every peer has read this rank's buffers (its done handshake).
        if let weights = shared.topkWeights, weights.address == buffers.receivedWeights?.address,
           input.topkWeights?.address != weights.address {
            try clear(weights, stream: stream)
        }
    }

    /// Refuses a dispatch output the group does not produce (received routing of a layout that
    /// has none, scales without FP8), as every backend's checks do (`CallShapes.refuseUnused`):
    /// the dispatch checks the slot's own buffers, so the caller's are checked here.
    public func refuseUnused(_ output: DispatchOutput) throws(EPError) { try engine.shapes.refuseUnused(output) }

    /// Whether `copyZones` can copy `tensor`'s element rows: 8-byte aligned (a view at an odd
    /// element is not).
    private func copiesZones(_ tensor: TensorRef) -> Bool { address(tensor) % 8 == 0 }

    /// The received zones of `handle`'s dispatched step (padding included) from `source` into
    /// `destination`, both receive-shaped element rows, on `stream` (`StepEngine.copyReceivedRows`).
    private func copyZones(_ handle: GPUStepHandle, from source: TensorRef, to destination: TensorRef, stream: CUDAStream) throws(EPError) {
        let from = address(source), to = address(destination)
        let vectorBytes = engine.vectorBytes(CollectionOfOne(from), CollectionOfOne(to))
        try engine.copyReceivedRows(handle, from: { _ in from }, to: { _ in to }, vectorBytes: vectorBytes, options: .init(stream))
    }

    /// Where this rank's tensors live.
    private var here: MemoryLocation { .device(device.ordinal) }

    private func copy(_ source: TensorRef, to destination: TensorRef?, stream: CUDAStream) throws(EPError) {
        guard let destination, source.byteCount > 0 else { return }
        try device.makeCurrent()
        try gpu { try device.driver.copy(from: source.devicePointer, to: destination.devicePointer, byteCount: source.byteCount, stream: stream) }
    }

    private func clear(_ buffer: TensorRef, stream: CUDAStream) throws(EPError) {
        guard buffer.byteCount > 0 else { return }
        try device.makeCurrent()
        try gpu { try device.driver.fill(buffer.devicePointer, byte: 0, byteCount: buffer.byteCount, stream: stream) }
    }
}
