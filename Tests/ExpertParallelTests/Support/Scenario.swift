import ExpertParallel

/// The four layouts, as test arguments.
enum LayoutKind: String, CaseIterable, Sendable, CustomStringConvertible {
    case llExpertMajor, llRankMajor, htFlat, htExpertMajor

    static let highThroughput: [LayoutKind] = [.htFlat, .htExpertMajor]

    var algorithm: Algorithm { self == .llExpertMajor || self == .llRankMajor ? .lowLatency : .highThroughput }

    func layout(alignment: Int) -> Layout {
        switch self {
        case .llExpertMajor: .expertMajor
        case .llRankMajor: .rankMajor
        case .htFlat: .flat
        case .htExpertMajor: .expertMajorPadded(alignment: alignment)
        }
    }

    var description: String { rawValue }
}

/// Everything one step of a group is made of: the configuration, the inactive ranks, and every
/// rank's routing (global expert ids, before masking), token rows and weights, plus the weight
/// gradients each destination hands to a backward HT combine.
struct Scenario: Sendable, CustomStringConvertible {
    var config: GroupConfig
    var inactive: Set<Int>
    /// B of each rank.
    var tokenCounts: [Int]
    /// `[rank][t * K + k]`: global expert id or -1.
    var routing: [[Int32]]
    /// `[rank][t * rowBytes + byte]`.
    var tokens: [[UInt8]]
    /// `[rank][t * K + k]`.
    var weights: [[Float]]
    /// `[destination rank][...]`: one value per element of `receiveRoutingShape` (HT), else empty.
    var weightGradients: [[Float]]
    /// Element type of the `topkIdx` routing input.
    var indexType: DataType = .i32
    /// Element type of the dispatch's `topkIdx` output.
    var receivedIndexType: DataType = .i32
    /// LL expert-major dispatch takes `topkWeights` optionally.
    var passesWeightsToExpertMajorDispatch = true

    var ranks: Int { config.ranks }
    var activeRanks: [Int] { (0..<config.ranks).filter { !inactive.contains($0) } }

    /// A scenario with the given routing; token rows (finite values of the element type, or
    /// random bytes for u8), weights and gradients are drawn from `dataSeed`.
    init(config: GroupConfig, tokenCounts: [Int], routing: [[Int32]], inactive: Set<Int> = [], dataSeed: Int = 1) {
        precondition(tokenCounts.count == config.ranks && routing.count == config.ranks)
        for r in 0..<config.ranks { precondition(routing[r].count == tokenCounts[r] * config.topK, "routing of rank \(r)") }
        self.config = config
        self.inactive = inactive
        self.tokenCounts = tokenCounts
        self.routing = routing
        var rng = SeededGenerator(seed: dataSeed)
        let type = config.elementType
        tokens = tokenCounts.map { b in
            if type == .u8 { return (0..<b * config.rowBytes).map { _ in UInt8.random(in: 0...255, using: &rng) } }
            return (0..<b * config.hidden).flatMap { _ in ReferenceArithmetic.encode(rng.float(-4..<4), as: type) }
        }
        weights = tokenCounts.map { b in (0..<b * config.topK).map { _ in rng.float(-1..<1) } }
        let gradientCount = config.algorithm == .highThroughput ? config.receiveRoutingShape!.reduce(1, *) : 0
        weightGradients = (0..<config.ranks).map { _ in (0..<gradientCount).map { _ in rng.float(-2..<2) } }
    }

    /// Replaces token rows with rows whose every element is `value(rank, token)` (exact in the
    /// element type), for hand-worked examples.
    mutating func setTokenValues(_ value: (Int, Int) -> Float) {
        for r in 0..<ranks {
            tokens[r] = (0..<tokenCounts[r]).flatMap { t in
                ReferenceArithmetic.encodeRow(Array(repeating: value(r, t), count: config.hidden), as: config.elementType)
            }
        }
    }

    var description: String {
        var lines = [
            "\(config.algorithm.rawValue) \(config.layout) R=\(config.ranks) E=\(config.experts) K=\(config.topK) H=\(config.hidden) \(config.elementType) Bmax=\(config.maxTokensPerRank) N=\(config.receiveCapacity) overflow=\(config.overflow) inactive=\(inactive.sorted()) idx=\(indexType)/\(receivedIndexType)",
        ]
        for r in 0..<ranks {
            let rows = (0..<tokenCounts[r]).map { t in "\(routing[r][t * config.topK..<(t + 1) * config.topK].map { Int($0) })" }
            lines.append("  rank \(r) B=\(tokenCounts[r]): \(rows.joined(separator: " "))")
        }
        return lines.joined(separator: "\n")
    }
}

/// How random scenarios are drawn.
struct ScenarioOptions {
    var elementTypes: [DataType] = [.bf16, .f16, .f32]
    /// Deactivate a random non-empty proper subset of the ranks (R ≥ 2).
    var masksRanks = false
    /// HT only: set this policy and a receive capacity N near the largest requirement, so that
    /// some steps overflow and some fit exactly.
    var overflow: OverflowPolicy? = nil
}

extension Scenario {
    static func random(_ kind: LayoutKind, seed: Int, _ options: ScenarioOptions = .init()) -> Scenario {
        var rng = SeededGenerator(seed: seed)
        let ranks = rng.int(1...8), local = rng.int(1...4), experts = ranks * local
        let topK = rng.chance(0.1) ? min(experts, 32) : rng.int(1...min(experts, 8))
        let type = rng.pick(options.elementTypes)
        let unit = 8 / type.byteSize                     // elements per 8 bytes
        let hidden = unit * rng.int(max(1, 8 / unit)...(64 / unit))
        let bmax = rng.int(1...12)
        let alignment = rng.pick([1, 2, 3, 4, 8, 16])
        var config = GroupConfig(
            algorithm: kind.algorithm, ranks: ranks, experts: experts, topK: topK, hidden: hidden, elementType: type,
            maxTokensPerRank: bmax, layout: kind.layout(alignment: alignment))

        let tokenCounts = (0..<ranks).map { _ in
            rng.chance(0.15) ? 0 : rng.chance(0.2) ? bmax : rng.int(0...bmax)
        }
        let minusOneRate = rng.pick([0, 0, 0.1, 0.3, 0.6, 1.0])
        let hot: [Int]? = rng.chance(0.3)
            ? Array(Array(0..<experts).shuffled(using: &rng).prefix(rng.int(1...min(experts, topK + 1)))) : nil
        let routing = tokenCounts.map { b in
            (0..<b).flatMap { _ in
                let candidates = (hot ?? Array(0..<experts)).shuffled(using: &rng)
                var row = (0..<topK).map { $0 < candidates.count ? Int32(candidates[$0]) : -1 }
                row.shuffle(using: &rng)
                return row.map { rng.chance(minusOneRate) ? -1 : $0 }
            }
        }
        var inactive: Set<Int> = []
        if options.masksRanks && ranks > 1 {
            inactive = Set(Array(0..<ranks).shuffled(using: &rng).prefix(rng.int(1...ranks - 1)))
        }
        let dataSeed = rng.int(0...1_000_000)
        if let policy = options.overflow {
            precondition(kind.algorithm == .highThroughput)
            config.overflow = policy
            let probe = Reference(Scenario(config: config, tokenCounts: tokenCounts, routing: routing, inactive: inactive))
            let required = probe.scenario.activeRanks.map { probe.requiredRows(on: $0) }.max() ?? 1
            config.maxReceivedTokensPerRank = max(1, rng.pick([
                rng.int(1...max(1, required)), required - 1, required, required + 1,
            ]))
        }
        var scenario = Scenario(config: config, tokenCounts: tokenCounts, routing: routing, inactive: inactive, dataSeed: dataSeed)
        scenario.indexType = rng.pick([.i32, .i64])
        scenario.receivedIndexType = rng.pick([.i32, .i64])
        scenario.passesWeightsToExpertMajorDispatch = rng.chance(0.5)
        return scenario
    }
}
