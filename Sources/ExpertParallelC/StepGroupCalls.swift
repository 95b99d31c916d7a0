import CExpertParallel
import ExpertParallel

/// One collective call's converted arguments, one entry per local rank (`localRanks` order).
enum StepCall {
    case update(topkIdx: [TensorRef])
    case dispatch([DispatchInput], [DispatchOutput])
    case combine([CombineInput], [CombineOutput], PassDirection)
}

/// A group backend whose group calls go through the core's `StepGroup`. The collective calls and
/// the status, layout and mask calls are written once, in the extension below; a backend gives
/// its group, the handle of the group calls' current step, and overrides the hooks where it
/// differs (their defaults are in the extension).
protocol StepGroupBackend: GroupBackend {
    associatedtype Group: StepGroup
    var group: Group { get throws }
    /// The handle of the group calls' own step (a config that names no step), or the error that
    /// says the group offers no collective calls.
    func stepHandle() throws -> Group.Handle
    /// The local ranks whose arguments a collective call reads; the others get placeholders.
    /// Default: every local rank.
    func callRanks() throws -> [Int]
    /// How a call made on the caller's `stream` runs. Default: on that stream (NULL: the
    /// group's own), the whole call, in the config's launch mode.
    func options(_ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) -> CallOptions
    /// Waits for what the status, layout and mask calls read. Default: nothing to wait for.
    func settle() throws
    /// Runs `body`, the core's call for `call` on `step` (nil: the group's own; its arguments
    /// read for `ranks`), and reports its failure. Default: the core's error as it is.
    func perform(_ call: StepCall, step: StepObject?, ranks: [Int], _ body: () throws(EPError) -> Void) throws
    /// The descriptors the collective calls were last given, converted (DescriptorCache.swift);
    /// nil: convert every call's. Default: nil.
    var descriptors: DescriptorCache? { get }
    /// Each local rank's tokens in the step `settings` names (a stacked combine's row counts).
    func stepTokens(_ settings: CallSettings) throws -> [Int]
}

extension StepGroupBackend {
    func callRanks() throws -> [Int] { try group.localRanks }

    func options(_ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) -> CallOptions {
        CallOptions(stream: OpaquePointer(stream), phase: settings.phase, launch: settings.mode)
    }

    func settle() throws {}

    func perform(_ call: StepCall, step: StepObject?, ranks: [Int], _ body: () throws(EPError) -> Void) throws { try body() }

    var descriptors: DescriptorCache? { nil }

    func stepTokens(_ settings: CallSettings) throws -> [Int] {
        throw UnsupportedCall(message: "this group offers no stacked calls")
    }

    func makeStep() throws -> any StepHandle { try group.makeHandle() }

    /// The handle of the step `settings` names, or the group's own.
    func handle(_ settings: CallSettings) throws -> Group.Handle {
        guard let step = settings.step else { return try stepHandle() }
        return try handle(of: step.handle)
    }

    func handle(of step: any StepHandle) throws -> Group.Handle {
        guard let handle = step as? Group.Handle else {
            throw InternalError(message: "a step of another kind of group reached this group")
        }
        return handle
    }

    func layoutInfo(step: any StepHandle, rank: Int) throws -> LayoutInfo {
        let handle = try handle(of: step)
        try checkStatus()
        return try group.layoutInfo(handle, rank: rank)
    }

    func complete(_ stream: UnsafeMutableRawPointer?) throws {
        try group.complete(options: options(CallSettings(), stream))
    }

    func updateAll(_ inputs: [epUpdateInputs_t], _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        let handle = try handle(settings), group = try self.group, ranks = try callRanks()
        let cache = descriptors
        let routing = try perRank(group, ranks) { r in
            try DescriptorCache.tensor(inputs[r].topkIdx, in: cache, r, .updateTopkIdx, "inputs[\(r)].topkIdx")
        }
            .map { $0 ?? .absent }
        try update(routing, handle: handle, ranks: ranks, settings, stream)
    }

    /// The update of converted routing (`localRanks` order, `.absent` where not read).
    private func update(_ routing: [TensorRef], handle: Group.Handle, ranks: [Int], _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        let group = try self.group, options = self.options(settings, stream)
        try perform(.update(topkIdx: routing), step: settings.step, ranks: ranks) { () throws(EPError) in
            try group.update(handle, topkIdx: routing, options: options)
        }
    }

    /// A stacked dispatch as the per-rank calls (StackedEntryPoints.swift): each rank's part of
    /// every array as its own tensor. The virtual GPU group has a faster path of its own.
    func dispatchStacked(_ call: StackedDispatch, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        let handle = try handle(settings), group = try self.group, ranks = try callRanks()
        // A dispatch with the step's routing (no topkIdx) must give the step's token count: named
        // as `call.tokens` here rather than as rank 0's input shape further on. The ranks read
        // are those of the step (a masked rank's routing was not read); where they differ in
        // tokens no stacked call can describe the step, refused as the virtual GPU group does.
        var known: Int?
        if call.topkIdx == nil, let tokens = try? stepTokens(settings) {
            let local = group.localRanks
            let counts = local.indices.filter { ranks.contains(local[$0]) && $0 < tokens.count }.map { tokens[$0] }
            if let first = counts.first, let other = counts.first(where: { $0 != first }) {
                throw EPError.invalidArgument(field: "topkIdx", value: "nil", requirement:
                    "must be given: the step's ranks have different token counts (\(first), \(other)), which a stacked call cannot send again")
            }
            known = counts.first
        }
        let checked = try CheckedStackedDispatch(call, shapes: CallShapes(validated: group.config), location: location, stepTokens: known)
        let parts = group.localRanks.map { checked.rank($0) }
        let local = group.localRanks
        if checked.topkIdx != nil {
            try update(local.indices.map { ranks.contains(local[$0]) ? parts[$0].topkIdx! : .absent }, handle: handle, ranks: ranks, settings, stream)
        }
        let ins = local.indices.map { ranks.contains(local[$0]) ? parts[$0].input : .absent }
        try dispatch(ins, parts.map(\.output), handle: handle, ranks: ranks, settings, stream)
    }

    /// A stacked combine as the per-rank calls.
    func combineStacked(_ call: StackedCombine, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        let handle = try handle(settings), group = try self.group, ranks = try callRanks()
        let tokens = try stepTokens(settings)
        let checked = try CheckedStackedCombine(call, stepTokens: tokens, direction: settings.direction, shapes: CallShapes(validated: group.config), location: location)
        let local = group.localRanks
        let parts = local.indices.map { ranks.contains(local[$0]) ? checked.rank($0) : (.absent, .absent) }
        try combine(parts.map(\.input), parts.map(\.output), handle: handle, ranks: ranks, settings, stream)
    }

    /// Fills the callers' layout infos after the dispatch (which then waits for it).
    func dispatchAll(
        _ inputs: [epDispatchInputs_t], _ outputs: [epDispatchOutputs_t], _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?
    ) throws {
        let handle = try handle(settings), group = try self.group, ranks = try callRanks()
        // Built in place (no per-rank tuples): this is the data path's host cost.
        let local = group.localRanks
        var ins: [DispatchInput] = [], outs: [DispatchOutput] = [], destinations: [(Int, LayoutInfoDestination)] = []
        let cache = descriptors
        ins.reserveCapacity(local.count)
        outs.reserveCapacity(local.count)
        for r in local {
            guard ranks.contains(r) else {
                ins.append(.absent)
                outs.append(.absent)
                continue
            }
            ins.append(try DispatchInput(inputs[r], "inputs[\(r)]", cache: cache, rank: r))
            outs.append(try DispatchOutput(outputs[r], "outputs[\(r)]", cache: cache, rank: r))
            if let destination = try LayoutInfoDestination(outputs[r].layoutInfo, "outputs[\(r)].layoutInfo") {
                destinations.append((r, destination))
            }
        }
        // A masked host rank's other arguments are not read, but its counts are (below).
        let counts = ranks.count == local.count ? outs : local.map { r in
            ranks.contains(r) ? outs[r]
                : DispatchOutput(tokens: .absent, topkIdx: nil, topkWeights: nil,
                                 expertCounts: (try? TensorDescriptor.optionalTensor(outputs[r].expertCounts, "counts")) ?? nil,
                                 expertSourceCounts: (try? TensorDescriptor.optionalTensor(outputs[r].expertSourceCounts, "counts")) ?? nil)
        }
        try dispatch(ins, counts, handle: handle, ranks: ranks, settings, stream)
        guard !destinations.isEmpty else { return }
        try checkStatus()
        for (r, destination) in destinations { destination.fill(try group.layoutInfo(handle, rank: r)) }
    }

    /// The dispatch of converted arguments (`localRanks` order; `outs` of every local rank, of
    /// which only the counts are read for a rank not in `ranks`).
    private func dispatch(
        _ ins: [DispatchInput], _ outs: [DispatchOutput], handle: Group.Handle, ranks: [Int], _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?
    ) throws {
        let group = try self.group, local = group.localRanks
        let options = self.options(settings, stream)
        let read = local.indices.map { ranks.contains(local[$0]) ? outs[$0] : .absent }
        try perform(.dispatch(ins, read), step: settings.step, ranks: ranks) { () throws(EPError) in
            try group.dispatch(handle, ins, into: read, direction: settings.direction, options: options)
        }
        // A masked host rank's arguments are not read, but counts it was given read as zero (as
        // the GPU writes them), so that a caller's count tensors never show an earlier step's.
        if case .host = location, local.contains(where: { !ranks.contains($0) }) {
            let l = group.config.localExperts
            let zero = LayoutInfo(expertCounters: Array(repeating: 0, count: l), expertOffsets: [], sourceRankCounters: [],
                                  expertSourceCounters: Array(repeating: 0, count: l * group.config.ranks), receivedTotal: 0, droppedTokens: 0)
            for i in local.indices where !ranks.contains(local[i]) {
                try? zero.writeCounts(experts: outs[i].expertCounts, expertSources: outs[i].expertSourceCounts)
            }
        }
    }

    /// The combine of converted arguments.
    private func combine(
        _ ins: [CombineInput], _ outs: [CombineOutput], handle: Group.Handle, ranks: [Int], _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?
    ) throws {
        let group = try self.group, options = self.options(settings, stream), direction = settings.direction
        try perform(.combine(ins, outs, direction), step: settings.step, ranks: ranks) { () throws(EPError) in
            try group.combine(handle, ins, into: outs, direction: direction, options: options)
        }
    }

    func combineAll(
        _ inputs: [epCombineInputs_t], _ outputs: [epCombineOutputs_t], _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?
    ) throws {
        let handle = try handle(settings), group = try self.group, ranks = try callRanks()
        let local = group.localRanks
        var ins: [CombineInput] = [], outs: [CombineOutput] = []
        let cache = descriptors
        ins.reserveCapacity(local.count)
        outs.reserveCapacity(local.count)
        for r in local {
            let read = ranks.contains(r)
            ins.append(read ? try CombineInput(inputs[r], "inputs[\(r)]", cache: cache, rank: r) : .absent)
            outs.append(read ? try CombineOutput(outputs[r], "outputs[\(r)]", cache: cache, rank: r) : .absent)
        }
        try combine(ins, outs, handle: handle, ranks: ranks, settings, stream)
    }

    func checkStatus() throws {
        try settle()
        try group.checkStatus()
    }

    func layoutInfo(rank: Int) throws -> LayoutInfo {
        try checkStatus()
        return try group.layoutInfo(try stepHandle(), rank: rank)
    }

    func activeRanks() throws -> RankMask {
        try settle()
        return try group.activeRanks
    }

    func deactivate(rank: Int) throws {
        try settle()
        try group.deactivate(rank: rank)
    }

    func clean(ranks: RankMask) throws {
        try settle()
        try group.clean(ranks: ranks)
    }

    /// `read(r)` for each local rank in `ranks`, in `localRanks` order; nil for the others.
    private func perRank<T>(_ group: Group, _ ranks: [Int], _ read: (Int) throws -> T) throws -> [T?] {
        try group.localRanks.map { r in ranks.contains(r) ? try read(r) : nil }
    }
}
