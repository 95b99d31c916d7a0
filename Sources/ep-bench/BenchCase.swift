import ExpertParallel

/// One standard case (docs/ep-bench.md) (or `custom`), as one group configuration.
struct BenchCase: Sendable {
    var name: String
    var algorithm: Algorithm
    var tokens: Int
    var hidden: Int
    var topK: Int
    var experts: Int
    var ranks: Int
    var layout: Layout
    var elementType: DataType = .bf16
    /// FP8 dispatch (nil: rows move in `elementType`).
    var fp8: FP8Dispatch? = nil
    /// The group's maxTokensPerRank where `--max-tokens` sets it (nil: `tokens`): a group sized
    /// for its largest batch, each step dispatching `tokens` (≤ it) per rank.
    var maxTokens: Int? = nil

    static let standard: [BenchCase] = [
        .init(name: "ll-std", algorithm: .lowLatency, tokens: 128, hidden: 7168, topK: 8, experts: 256, ranks: 8, layout: .expertMajor),
        .init(name: "ll-32", algorithm: .lowLatency, tokens: 32, hidden: 7168, topK: 8, experts: 256, ranks: 8, layout: .expertMajor),
        .init(name: "ll-1", algorithm: .lowLatency, tokens: 1, hidden: 7168, topK: 8, experts: 256, ranks: 8, layout: .expertMajor),
        .init(name: "ht-std", algorithm: .highThroughput, tokens: 4096, hidden: 7168, topK: 8, experts: 256, ranks: 8, layout: .flat),
        .init(name: "ht-4k", algorithm: .highThroughput, tokens: 4096, hidden: 4096, topK: 8, experts: 256, ranks: 8, layout: .flat),
        .init(name: "odd", algorithm: .lowLatency, tokens: 77, hidden: 2880, topK: 10, experts: 96, ranks: 6, layout: .expertMajor),
        .init(name: "odd", algorithm: .highThroughput, tokens: 77, hidden: 2880, topK: 10, experts: 96, ranks: 6, layout: .flat),
        // A reduced HT case that a 2-core CPU runs in seconds.
        .init(name: "ht-cpu", algorithm: .highThroughput, tokens: 512, hidden: 7168, topK: 8, experts: 256, ranks: 8, layout: .flat),
    ]

    static var names: [String] {
        var seen: [String] = []
        for c in standard where !seen.contains(c.name) { seen.append(c.name) }
        return seen
    }

    /// The group: sized for `maxTokens` per rank where given (HT's receive capacity too, as
    /// GroupConfig derives it), else for the `tokens` each step dispatches.
    func config() -> GroupConfig {
        GroupConfig(
            algorithm: algorithm, ranks: ranks, experts: experts, topK: topK, hidden: hidden,
            elementType: elementType, maxTokensPerRank: maxTokens ?? tokens, layout: layout, fp8: fp8)
    }

    /// The same case with `ranks` ranks and the same experts (L = E / R).
    func with(ranks: Int) -> BenchCase {
        var copy = self
        copy.ranks = ranks
        return copy
    }

    var label: String {
        "\(name) \(algorithm.rawValue) \(layout) \(dtypeName) R=\(ranks) B=\(tokens)" + (maxTokens.map { $0 != tokens ? " max=\($0)" : "" } ?? "")
    }

    /// The element type, or the FP8 scale mode (`fp8/ue8m0`; pass-through: `fp8/ue8m0/pass`).
    var dtypeName: String { Self.dtypeName(elementType: elementType.rawValue, fp8: fp8) }

    static func dtypeName(elementType: String, fp8: FP8Dispatch?) -> String {
        guard let fp8 else { return elementType }
        return "fp8/\(FP8Choice.name(of: fp8.scales))" + (fp8.source == .passThrough ? "/pass" : "")
    }
}
