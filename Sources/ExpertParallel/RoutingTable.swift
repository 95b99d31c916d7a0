/// One rank's routing for one step, validated: `experts[t * topK + k]` is -1 or a global expert id,
/// and no expert appears twice in a token's row.
public struct RoutingTable: Sendable, Equatable {
    public let tokens: Int
    public let topK: Int
    public private(set) var experts: [Int32]

    /// Validates `config` (`validated()`), then `experts` (row-major `[tokens, topK]`) against it.
    public init(experts: [Int32], tokens: Int, config: GroupConfig) throws(EPError) {
        try self.init(experts: experts, tokens: tokens, checked: config.validated())
    }

    /// `init(experts:tokens:config:)` for a configuration already validated.
    private init(experts: [Int32], tokens: Int, checked config: GroupConfig) throws(EPError) {
        guard tokens >= 0, tokens <= config.maxTokensPerRank else {
            throw .invalidArgument(
                field: "topkIdx.shape[0] (tokens)", value: "\(tokens)",
                requirement: "must be in 0...maxTokensPerRank (\(config.maxTokensPerRank))")
        }
        guard experts.count == tokens * config.topK else {
            throw .invalidArgument(
                field: "topkIdx.count", value: "\(experts.count)",
                requirement: "must be tokens × topK = \(tokens) × \(config.topK)")
        }
        let k = config.topK
        for t in 0..<tokens {
            for c in 0..<k {
                let e = experts[t * k + c]
                guard e >= -1, Int(e) < config.experts else {
                    throw .invalidArgument(
                        field: "topkIdx[\(t)][\(c)]", value: "\(e)",
                        requirement: "must be -1 or in [0, \(config.experts))")
                }
                if e >= 0, let first = (0..<c).first(where: { experts[t * k + $0] == e }) {
                    throw .repeatedExpert(token: t, firstColumn: first, secondColumn: c, expert: Int(e))
                }
            }
        }
        self.tokens = tokens
        self.topK = k
        self.experts = experts
    }

    /// Validates `config` (`validated()`), then reads and validates a `[B, K]` int32 or int64 host tensor.
    public init(topkIdx: TensorRef, config: GroupConfig) throws(EPError) {
        try self.init(topkIdx: topkIdx, checked: config.validated())
    }

    /// `init(topkIdx:config:)` for a configuration already validated (a group's own, every step).
    package init(topkIdx: TensorRef, checked config: GroupConfig) throws(EPError) {
        guard topkIdx.shape.count == 2, topkIdx.shape[1] == config.topK else {
            throw .invalidArgument(
                field: "topkIdx.shape", value: "\(topkIdx.shape)", requirement: "must be [tokens, topK = \(config.topK)]")
        }
        // The row count is the caller's: bound it before anything is allocated for it or read.
        let tokens = topkIdx.shape[0]
        guard tokens >= 0, tokens <= config.maxTokensPerRank else {
            throw .invalidArgument(
                field: "topkIdx.shape[0] (tokens)", value: "\(tokens)",
                requirement: "must be in 0...maxTokensPerRank (\(config.maxTokensPerRank))")
        }
        try TensorCheck.require(topkIdx, "topkIdx", dtypes: [.i32, .i64], shape: topkIdx.shape)
        try config.checkHostStepMemory(tokens: tokens)
        let count = tokens * config.topK
        var values = [Int32](repeating: -1, count: count)
        if let base = topkIdx.address {
            for i in 0..<count {
                let v: Int64 = topkIdx.dtype == .i32
                    ? Int64(base.load(fromByteOffset: i * 4, as: Int32.self))
                    : base.load(fromByteOffset: i * 8, as: Int64.self)
                guard v >= -1, v < Int64(config.experts) else {
                    throw .invalidArgument(
                        field: "topkIdx[\(i / config.topK)][\(i % config.topK)]", value: "\(v)",
                        requirement: "must be -1 or in [0, \(config.experts))")
                }
                values[i] = Int32(v)
            }
        }
        try self.init(experts: values, tokens: tokens, checked: config)
    }

    /// The expert of `token`'s column `k` (-1: none). `invalidArgument` naming `token` unless it
    /// is in `0..<tokens`, or `k` unless it is in `0..<topK` (a `k` past `topK` would otherwise
    /// read another token's entry). `experts` is the whole table, row-major.
    public subscript(token: Int, k: Int) -> Int {
        get throws(EPError) {
            guard token >= 0 && token < tokens else {
                throw .invalidArgument(field: "token", value: "\(token)", requirement: "must be in 0..<\(tokens) (the table's tokens)")
            }
            guard k >= 0 && k < topK else {
                throw .invalidArgument(field: "k", value: "\(k)", requirement: "must be in 0..<\(topK) (topK)")
            }
            return Int(experts[token * topK + k])
        }
    }

    /// `self[token, k]` unchecked, for the library's loops over `0..<tokens` and `0..<topK`.
    @inline(__always)
    package func expert(_ token: Int, _ k: Int) -> Int { Int(experts[token * topK + k]) }

    /// The same routing with every selection of an expert on an inactive rank replaced by -1.
    func masked(_ active: RankMask, localExperts: Int) -> RoutingTable {
        var copy = self
        for i in copy.experts.indices where copy.experts[i] >= 0 && !active.contains(Int(copy.experts[i]) / localExperts) {
            copy.experts[i] = -1
        }
        return copy
    }
}
