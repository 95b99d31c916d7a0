/// Inputs of a dispatch on one rank.
public struct DispatchInput: Sendable {
    /// `[B, H]` token rows of the payload type.
    public var tokens: TensorRef
    /// `[B, K]` float32 routing weights; required by every layout except LL expert-major (whose
    /// source keeps its weights for combine).
    public var topkWeights: TensorRef?
    /// FP8 pass-through groups: `[B, scale words]` scales of `tokens` (e4m3), float32 or packed
    /// exponent bytes (int32), as docs/fp8.md says.
    public var scales: TensorRef?

    public init(tokens: TensorRef, topkWeights: TensorRef? = nil, scales: TensorRef? = nil) {
        self.tokens = tokens
        self.topkWeights = topkWeights
        self.scales = scales
    }
}

/// Caller-owned outputs of a dispatch on one rank. Shapes, with N = `receiveCapacity`:
/// - LL expert-major: `tokens [L, R*Bmax, H]`;
/// - LL rank-major: `tokens [R, Bmax, H]`, `topkIdx [R, Bmax, K]`, `topkWeights [R, Bmax, K]`;
/// - HT flat: `tokens [N, H]`, `topkIdx [N, K]`, `topkWeights [N, K]`;
/// - HT expert-major: `tokens [N, H]`, `topkIdx [N]` (local expert of each slot, -1 for padding),
///   `topkWeights [N]` (one weight per slot, 0 for padding).
/// `topkIdx` holds local expert ids (int32 or int64), -1 where the expert lives elsewhere.
/// Rows outside the received zones are left as they were.
public struct DispatchOutput: Sendable {
    public var tokens: TensorRef
    public var topkIdx: TensorRef?
    public var topkWeights: TensorRef?
    /// Optional: rows per local expert, `[L]` int32, written by the dispatch where the group works
    /// (GPU: on the stream, no host synchronisation); zeros for a masked rank.
    public var expertCounts: TensorRef?
    /// Optional: rows per (local expert, source rank), `[L, R]` int32, likewise.
    public var expertSourceCounts: TensorRef?
    /// FP8 groups: the received rows' scales, `receiveScalesShape` (float32 or int32 words).
    public var scales: TensorRef?

    public init(
        tokens: TensorRef, topkIdx: TensorRef? = nil, topkWeights: TensorRef? = nil, expertCounts: TensorRef? = nil,
        expertSourceCounts: TensorRef? = nil, scales: TensorRef? = nil
    ) {
        self.tokens = tokens
        self.topkIdx = topkIdx
        self.topkWeights = topkWeights
        self.expertCounts = expertCounts
        self.expertSourceCounts = expertSourceCounts
        self.scales = scales
    }
}

/// Inputs of a combine on one rank.
public struct CombineInput: Sendable {
    /// This rank's expert outputs, shaped like its dispatch `tokens` output.
    public var expertOutputs: TensorRef
    /// Weights combine applies in the forward pass: LL expert-major, the source's `[B, K]` routing
    /// weights; HT expert-major, the per-slot `[N]` weights this rank received from dispatch.
    public var topkWeights: TensorRef?
    /// Backward HT only: weight gradients per received row, shaped like the dispatch `topkWeights`
    /// output (`[N, K]` flat, `[N]` expert-major).
    public var weightGradients: TensorRef?

    public init(expertOutputs: TensorRef, topkWeights: TensorRef? = nil, weightGradients: TensorRef? = nil) {
        self.expertOutputs = expertOutputs
        self.topkWeights = topkWeights
        self.weightGradients = weightGradients
    }
}

/// Caller-owned outputs of a combine on one rank.
public struct CombineOutput: Sendable {
    /// `[B, H]` combined rows in the original token order.
    public var tokens: TensorRef
    /// Backward HT only: `[B, K]` float32 weight gradients, 0 for -1 or dropped selections.
    public var topkWeightGradients: TensorRef?

    public init(tokens: TensorRef, topkWeightGradients: TensorRef? = nil) {
        self.tokens = tokens
        self.topkWeightGradients = topkWeightGradients
    }
}

/// What one rank (one process in a multi-GPU job, or one member of a group) calls.
public protocol Rank: Sendable {
    associatedtype Handle: AnyObject & Sendable
    var config: GroupConfig { get }
    var rank: Int { get }
    /// Control path: may allocate.
    func makeHandle() throws(EPError) -> Handle
    /// Data path: this step's routing, `[B, K]` int32 or int64, B ≤ maxTokensPerRank.
    func update(_ handle: Handle, topkIdx: TensorRef) throws(EPError)
    func dispatch(_ handle: Handle, _ input: DispatchInput, into output: DispatchOutput,
                  direction: PassDirection) throws(EPError) -> LayoutInfo
    /// Needs a dispatch of the handle's step (since its last update) first: `wrongOrder` otherwise.
    func combine(_ handle: Handle, _ input: CombineInput, into output: CombineOutput,
                 direction: PassDirection) throws(EPError)
    /// The group's active-rank mask.
    var activeRanks: RankMask { get }
    /// Masks `rank` inactive: it sends and receives nothing until cleaned. A step's ranks are those
    /// active at its update, so after a rank is masked mid-step (between update and dispatch, or
    /// dispatch and combine) the step's next call fails at once with `wrongOrder` (the masked
    /// rank's own with `inactiveRank`), and a call waiting for the masked rank stops waiting with
    /// `wrongOrder`: none waits out the timeout. Update again (without the rank) to go on. A rank
    /// outside the group is ignored.
    func deactivate(rank: Int)
    /// Marks the given ranks active again. Call between steps only: steps updated before are
    /// refused (`wrongOrder`) until updated again.
    func clean(ranks: RankMask)
}
