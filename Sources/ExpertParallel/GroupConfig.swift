/// Low latency (decode) or high throughput (training, prefill).
public enum Algorithm: String, Sendable, Hashable { case lowLatency = "ll", highThroughput = "ht" }

/// How received rows are laid out on the destination rank (docs/architecture.md, "Vocabulary").
public enum Layout: Sendable, Hashable, CustomStringConvertible {
    /// LL: `[L, R*Bmax, H]`, one packed zone per local expert, rows in (source rank, token) order.
    case expertMajor
    /// LL: `[R, Bmax, H]`, one zone per source rank, one row per (source token, this rank).
    case rankMajor
    /// HT: `[N, H]`, one row per (source token, this rank), in (source rank, token) order.
    case flat
    /// HT: `[N, H]`, one zone per local expert, each zone's length padded to `alignment` rows.
    case expertMajorPadded(alignment: Int)

    public var description: String {
        switch self {
        case .expertMajor: "expert-major"
        case .rankMajor: "rank-major"
        case .flat: "flat"
        case .expertMajorPadded(let a): "expert-major(alignment \(a))"
        }
    }
}

/// What happens when more rows would reach a rank than `maxReceivedTokensPerRank`.
public enum OverflowPolicy: String, Sendable, Hashable {
    /// The handle update fails with `EPError.overflow`; no output is touched.
    case fail
    /// Rows are kept in (source rank, token) order while they fit; the rest are dropped and counted.
    case drop
}

/// Forward pass: combine applies the routing weights where the layout says so.
/// Backward pass: combine sums gradients unweighted and (HT) carries weight gradients back.
public enum PassDirection: String, Sendable, Hashable { case forward, backward }

/// The shape of one expert-parallel group. Every rank of a group uses the same configuration.
public struct GroupConfig: Sendable, Hashable {
    public var algorithm: Algorithm
    public var ranks: Int
    public var experts: Int
    public var topK: Int
    /// Elements per token row.
    public var hidden: Int
    public var elementType: DataType
    public var maxTokensPerRank: Int
    /// HT receive capacity N in rows; `nil` picks a size that can never overflow.
    public var maxReceivedTokensPerRank: Int?
    public var layout: Layout
    public var overflow: OverflowPolicy
    /// Bound on every wait for another rank.
    public var timeout: Duration
    /// FP8 dispatch (nil: rows move in `elementType`).
    public var fp8: FP8Dispatch?

    public init(
        algorithm: Algorithm, ranks: Int, experts: Int, topK: Int, hidden: Int,
        elementType: DataType = .bf16, maxTokensPerRank: Int, maxReceivedTokensPerRank: Int? = nil,
        layout: Layout? = nil, overflow: OverflowPolicy = .fail, timeout: Duration = .seconds(10), fp8: FP8Dispatch? = nil
    ) {
        self.algorithm = algorithm
        self.ranks = ranks
        self.experts = experts
        self.topK = topK
        self.hidden = hidden
        self.elementType = elementType
        self.maxTokensPerRank = maxTokensPerRank
        self.maxReceivedTokensPerRank = maxReceivedTokensPerRank
        self.layout = layout ?? (algorithm == .lowLatency ? .expertMajor : .flat)
        self.overflow = overflow
        self.timeout = timeout
        self.fp8 = fp8
    }

    // The sizes derived from the fields are exact for a configuration that `validated()` accepts;
    // asked of any other they do not trap: L is 0 for ranks < 1 and products saturate at
    // Int.max (Int.min) where they would leave Int.

    /// Experts per rank, L = E / R (0 for ranks < 1).
    public var localExperts: Int { ranks >= 1 ? experts / ranks : 0 }
    public var rowBytes: Int { Saturating.product(hidden, elementType.byteSize) }
    public var isExpertMajorHT: Bool { if case .expertMajorPadded = layout { true } else { false } }
    public var alignment: Int { if case .expertMajorPadded(let a) = layout { a } else { 1 } }

    /// Rows of the receive buffer on each rank, as dispatch output shapes use it:
    /// LL expert-major `L*R*Bmax`, LL rank-major `R*Bmax`, HT `N`.
    public var receiveCapacity: Int {
        switch layout {
        case .expertMajor: Saturating.product(localExperts, ranks, maxTokensPerRank)
        case .rankMajor: Saturating.product(ranks, maxTokensPerRank)
        case .flat: maxReceivedTokensPerRank ?? Saturating.product(ranks, maxTokensPerRank)
        case .expertMajorPadded(let a):
            maxReceivedTokensPerRank
                ?? Saturating.sum(Saturating.product(ranks, maxTokensPerRank, min(topK, localExperts)),
                                  Saturating.product(localExperts, Saturating.sum(a, -1)))
        }
    }

    /// Largest group this build supports (the mask is 64 bits; kernels use it too).
    public static let maxRanks = 64
    /// Largest top-k supported.
    public static let maxTopK = 32
    /// Largest `experts`, `hidden` and `maxTokensPerRank` (the C ABI's 32-bit range): with them
    /// no size computation of any backend leaves `Int`.
    public static let maxCount = Int(Int32.max)
    /// Largest `maxReceivedTokensPerRank`.
    public static let maxReceivedTokens = 1 << 40

    /// Checks every bound; the error names the field, its value and the bound.
    public func validated() throws(EPError) -> Self {
        func fail(_ field: String, _ value: Any, _ requirement: String) -> EPError {
            .invalidConfig(field: field, value: "\(value)", requirement: requirement)
        }
        guard ranks >= 1, ranks <= Self.maxRanks else { throw fail("ranks", ranks, "must be in 1...\(Self.maxRanks)") }
        guard experts >= 1 else { throw fail("experts", experts, "must be ≥ 1") }
        guard experts <= Self.maxCount else { throw fail("experts", experts, "must be ≤ \(Self.maxCount)") }
        guard experts % ranks == 0 else {
            throw fail("experts", experts, "must be a multiple of ranks (\(ranks))")
        }
        guard topK >= 1 else { throw fail("topK", topK, "must be ≥ 1") }
        guard topK <= experts else { throw fail("topK", topK, "must be ≤ experts (\(experts))") }
        guard topK <= Self.maxTopK else { throw fail("topK", topK, "must be ≤ \(Self.maxTopK)") }
        guard hidden >= 1 else { throw fail("hidden", hidden, "must be ≥ 1") }
        guard hidden <= Self.maxCount else { throw fail("hidden", hidden, "must be ≤ \(Self.maxCount)") }
        guard elementType.isTokenType else {
            throw fail("elementType", elementType, "must be bf16, f16, f32 or u8")
        }
        guard rowBytes % 8 == 0 else {
            throw fail("hidden", hidden, "hidden × \(elementType.byteSize) bytes (= \(rowBytes)) must be a multiple of 8 bytes")
        }
        guard maxTokensPerRank >= 1 else { throw fail("maxTokensPerRank", maxTokensPerRank, "must be ≥ 1") }
        guard maxTokensPerRank <= Self.maxCount else {
            throw fail("maxTokensPerRank", maxTokensPerRank, "must be ≤ \(Self.maxCount)")
        }
        if let n = maxReceivedTokensPerRank, n > Self.maxReceivedTokens {
            throw fail("maxReceivedTokensPerRank", n, "must be ≤ \(Self.maxReceivedTokens)")
        }
        if let fp8 {
            guard elementType.isFloating else {
                throw fail("elementType", elementType, "must be bf16, f16 or f32 with fp8 (\(fp8)): combine runs in it")
            }
            guard hidden % fp8.scales.blockSize == 0 else {
                throw fail("hidden", hidden, "must be a multiple of \(fp8.scales.blockSize), the block of FP8 scale mode \(fp8.scales)")
            }
        }
        // Every wait counts whole nanoseconds (the kernels take the timeout in ns): a shorter one
        // would be 0. The value is echoed as given.
        guard timeout >= .nanoseconds(1) else { throw fail("timeout", timeout, "must be ≥ 1 nanosecond") }
        // Kernels take the timeout in nanoseconds as 64 bits; a day is far past any useful wait.
        guard timeout <= .seconds(86_400) else { throw fail("timeout", timeout, "must be ≤ 86400 seconds") }
        switch (algorithm, layout) {
        case (.lowLatency, .expertMajor), (.lowLatency, .rankMajor):
            if let n = maxReceivedTokensPerRank {
                throw fail("maxReceivedTokensPerRank", n, "must be nil for LL: its receive zones are sized by maxTokensPerRank")
            }
        case (.highThroughput, .flat), (.highThroughput, .expertMajorPadded):
            if case .expertMajorPadded(let a) = layout, a < 1 || a > 1024 {
                throw fail("layout.alignment", a, "must be in 1...1024")
            }
            if let n = maxReceivedTokensPerRank, n < 1 {
                throw fail("maxReceivedTokensPerRank", n, "must be ≥ 1 (or nil for automatic)")
            }
        default:
            throw fail("layout", layout, "is not a layout of algorithm \(algorithm.rawValue): LL takes expertMajor or rankMajor, HT takes flat or expertMajorPadded")
        }
        return self
    }
}
