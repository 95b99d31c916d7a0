/// A call split in two: `.sendOnly` enqueues the sending half and returns, so the caller can
/// overlap other work; `complete()` enqueues the half that waits for the data. Backends that
/// finish every call before returning (the host backend) run `.sendOnly` as `.whole`.
public enum CallPhase: Sendable, Hashable { case whole, sendOnly }

/// How a group that drives several ranks on one GPU runs one call for them.
public enum LaunchMode: Sendable, Hashable {
    /// One launch covering every rank (the rank is a block coordinate): the fast path.
    case single
    /// One launch per rank on its own stream, each rank limited to 1/R of the SMs, joined by
    /// events: shows that ranks meet only through flags.
    case perRank
}

/// How one data-path call runs, beyond its tensors. Backends ignore what has no meaning to them
/// (the host backend has no stream).
public struct CallOptions: @unchecked Sendable, Hashable {   // the stream is an address
    /// The CUDA stream (`CUstream`) to enqueue on; nil: the group's own stream.
    public var stream: OpaquePointer?
    public var phase: CallPhase
    public var launch: LaunchMode

    public init(stream: OpaquePointer? = nil, phase: CallPhase = .whole, launch: LaunchMode = .single) {
        self.stream = stream
        self.phase = phase
        self.launch = launch
    }
}

/// One step's handle on a `StepGroup`: the routing of one update and what was derived from it.
/// Several can be live at once (one per MoE layer, micro-batch or pass); a handle's combine and
/// backward dispatch use its own routing, whatever other handles were updated since.
public protocol StepHandle: AnyObject, Sendable {
    /// Frees what the handle holds; later calls with it fail with `wrongOrder`. Also on deinit.
    func release()
}

/// What every backend offers, whether it drives all R ranks in this process (the host group,
/// the virtual GPU group) or one rank of a multi-process group (an NCCL rank): each call takes
/// one tensor per rank in `localRanks`, in that order.
public protocol StepGroup: AnyObject, Sendable {
    associatedtype Handle: StepHandle
    var config: GroupConfig { get }
    /// The ranks this object drives, in the order of the per-rank arrays every call takes.
    var localRanks: [Int] { get }
    /// Control path: may allocate (a few KB of routing metadata per rank).
    func makeHandle() throws(EPError) -> Handle
    /// Data path: the step's routing of each local rank, `[B, K]` int32 or int64.
    func update(_ handle: Handle, topkIdx: [TensorRef], options: CallOptions) throws(EPError)
    func dispatch(
        _ handle: Handle, _ inputs: [DispatchInput], into outputs: [DispatchOutput], direction: PassDirection,
        options: CallOptions) throws(EPError)
    func combine(
        _ handle: Handle, _ inputs: [CombineInput], into outputs: [CombineOutput], direction: PassDirection,
        options: CallOptions) throws(EPError)
    /// Enqueues the second half of the last `.sendOnly` call.
    func complete(options: CallOptions) throws(EPError)
    /// What local rank `rank` received in `handle`'s step (may synchronise).
    func layoutInfo(_ handle: Handle, rank: Int) throws(EPError) -> LayoutInfo
    /// Throws the first error found on the device since the last check (may synchronise).
    func checkStatus() throws(EPError)
    var activeRanks: RankMask { get throws(EPError) }
    func deactivate(rank: Int) throws(EPError)
    func clean(ranks: RankMask) throws(EPError)
}

extension LayoutInfo {
    /// Writes `expertCounters` (`[L]`) and `expertSourceCounters` (`[L, R]`) as int32 into host
    /// tensors of those shapes (checked by the caller); nil skips one.
    public func writeCounts(experts: TensorRef?, expertSources: TensorRef?) throws(EPError) {
        for (tensor, values) in [(experts, expertCounters), (expertSources, expertSourceCounters)] {
            guard let tensor else { continue }
            try TensorCheck.require(tensor, "counts", dtypes: [.i32], shape: tensor.shape, location: .host)
            guard tensor.elementCount == values.count, let base = tensor.address else {
                throw .invalidArgument(field: "counts", value: "\(tensor.shape)", requirement: "must hold \(values.count) int32 counts")
            }
            let words = base.bindMemory(to: Int32.self, capacity: values.count)
            for (i, value) in values.enumerated() { words[i] = Int32(truncatingIfNeeded: value) }
        }
    }
}
