import ArgumentParser
import ExpertParallel

/// Which cases run, and what overrides their shape, layout and element type
/// (`CaseOptions+Resolve.swift` turns them into the cases).
struct CaseOptions: ParsableArguments {
    @Option(name: .customLong("case"), help: "Case to run (repeatable): \(CaseOptions.names.joined(separator: ", ")). Default: ll-std and ht-cpu on the CPU; ll-std, ll-32, ll-1 and odd on the GPU. custom takes its shape from --tokens, --hidden, --topk, --experts and --ranks (all needed) and its algorithm from --layout (default expert-major, LL).")
    var cases: [String] = []

    @Option(parsing: .unconditional, help: "Ranks R, 1...64 (overrides the case's; must divide the experts).", transform: NumberArgument.whole(Bounds.ranks))
    var ranks: Int?

    @Option(name: .customLong("tokens"), parsing: .unconditionalSingleValue, help: "Tokens per rank B, 1...1048576 (overrides the case's). A list (--tokens 16,64,256, or the option repeated) runs every case once per count (the points of --plot).", transform: NumberArgument.wholeList(Bounds.tokens))
    var tokensLists: [[Int]] = []

    /// The token counts given, in the order given, each once (empty: the cases' own).
    var tokenCounts: [Int] {
        var seen: [Int] = []
        for count in tokensLists.joined() where !seen.contains(count) { seen.append(count) }
        return seen
    }

    /// The only token count given (nil: none, or several).
    var tokens: Int? { tokenCounts.count == 1 ? tokenCounts[0] : nil }

    @Option(name: .customLong("max-tokens"), parsing: .unconditional, help: "Tokens per rank M the groups are sized for, 1...1048576 and at least every B of the run (the largest --tokens, or each case's): each step still dispatches B tokens per rank, and bytes and floors count those B. Default: B (a group sized for its step).", transform: NumberArgument.whole(Bounds.tokens))
    var maxTokens: Int?

    @Option(parsing: .unconditional, help: "Hidden size H in elements, 1...1048576 (overrides the case's); a row of H elements must be a multiple of 8 bytes.", transform: NumberArgument.whole(Bounds.hidden))
    var hidden: Int?

    @Option(name: .customLong("topk"), parsing: .unconditional, help: "Experts per token K, 1...32 and at most the experts (overrides the case's).", transform: NumberArgument.whole(Bounds.topK))
    var topK: Int?

    @Option(parsing: .unconditional, help: "Experts E, 1...1048576, a multiple of the ranks (overrides the case's; the GPU takes at most 1024).", transform: NumberArgument.whole(Bounds.experts))
    var experts: Int?

    @Option(help: "Receive layout, overriding the case's: expert-major or rank-major for LL cases, flat or expert-major-padded for HT cases. A layout of the other algorithm is a usage error; odd runs its variant of the layout's algorithm, and without --case only the default cases of that algorithm run.")
    var layout: LayoutChoice?

    @Option(parsing: .unconditional, help: "Rows each expert's zone is padded to with --layout expert-major-padded, 1...1024 (default 1).", transform: NumberArgument.whole(Bounds.alignment))
    var alignment: Int?

    @Option(name: .customLong("dtype"), help: ArgumentHelp("Token element type. u8 is dispatch only: its combine rows are skipped, with a note, and its rows are checked as received.", valueName: "dtype"))
    var dtypeOption = Defaulted(DTypeChoice.bf16)
    /// The element type.
    var dtype: DTypeChoice { dtypeOption.value }
    /// The element type where --dtype was given (nil where not, for the options a drill refuses).
    var givenDtype: DTypeChoice? { dtypeOption.given }

    @Option(help: "FP8 dispatch: rows move as e4m3 with a scale per block, float32 (blocks of 128, float32 scales), ue8m0 (blocks of 128, power-of-two exponent bytes) or e8m0 (blocks of 32, MXFP8). The hidden size must be a multiple of the block; --dtype (bf16, f16 or f32) stays the type of the source rows and of combine.")
    var fp8: FP8Choice?

    @Option(help: "With --fp8: quantize (the dispatch quantises the --dtype rows; default) or pass-through (e4m3 rows and their scales, quantised before the timing, move unchanged).")
    var fp8Source: FP8SourceChoice?

    /// The FP8 dispatch the cases run with (nil: rows move in --dtype).
    var fp8Dispatch: FP8Dispatch? { fp8.map { FP8Dispatch(scales: $0.mode, source: (fp8Source ?? .quantize).source) } }

    static let customName = "custom"
    static var names: [String] { BenchCase.names + [customName] }

    /// The library's bounds (GroupConfig.validated: ranks, top-k, alignment), and upper bounds of
    /// the bench's own where the library has none, so that no product of them overflows; the
    /// host memory a case needs is checked against this machine's before it runs.
    enum Bounds {
        static let ranks = 1...GroupConfig.maxRanks
        static let tokens = 1...1_048_576
        static let hidden = 1...1_048_576
        static let topK = 1...GroupConfig.maxTopK
        static let experts = 1...1_048_576
        static let alignment = 1...1_024
        /// Random scores the routing of a case draws at most, tokens × experts × ranks (one per
        /// expert for every token of every rank), a bound the memory check does not give: the
        /// largest standard case draws 2^23; 2^32 take about 15 s in a release build.
        static let routingScores = 1 << 32
    }

    func validate() throws {
        for name in cases where !Self.names.contains(name) {
            throw ValidationError("unknown case '\(name)'; known cases: \(Self.names.joined(separator: ", "))")
        }
        try checkRange("--ranks", ranks, Bounds.ranks)
        for count in tokensLists.joined() { try checkRange("--tokens", count, Bounds.tokens) }
        try checkRange("--max-tokens", maxTokens, Bounds.tokens)
        try checkRange("--hidden", hidden, Bounds.hidden)
        try checkRange("--topk", topK, Bounds.topK)
        try checkRange("--experts", experts, Bounds.experts)
        try checkRange("--alignment", alignment, Bounds.alignment)
        if let fp8Source, fp8 == nil {
            throw ValidationError("--fp8-source \(fp8Source.rawValue) needs --fp8 float32|ue8m0|e8m0")
        }
        if let alignment, layout != .expertMajorPadded {
            let given = layout.map { "--layout \($0.rawValue)" } ?? "no --layout"
            throw ValidationError("--alignment \(alignment) needs --layout expert-major-padded (got \(given))")
        }
    }

    /// The options given, as the command line writes them (`--case ll-1 --case odd`, `--tokens
    /// 16,64`), in the order of `--help`, each with its option's name.
    var given: [(option: String, text: String)] {
        let values: [(String, String?)] = [
            ("--case", cases.isEmpty ? nil : cases.joined(separator: " --case ")), ("--ranks", ranks.map(String.init)),
            ("--tokens", tokenCounts.isEmpty ? nil : tokenCounts.map(String.init).joined(separator: ",")),
            ("--max-tokens", maxTokens.map(String.init)),
            ("--hidden", hidden.map(String.init)), ("--topk", topK.map(String.init)), ("--experts", experts.map(String.init)),
            ("--layout", layout?.rawValue), ("--alignment", alignment.map(String.init)), ("--dtype", givenDtype?.rawValue),
            ("--fp8", fp8?.rawValue), ("--fp8-source", fp8Source?.rawValue),
        ]
        return values.compactMap { option, value in value.map { (option, "\(option) \($0)") } }
    }

    /// The shape options given, as `--name value`.
    var shapeOverrides: [(option: String, value: Int?)] {
        [("--tokens", tokenCounts.first), ("--hidden", hidden), ("--topk", topK), ("--experts", experts), ("--ranks", ranks)]
    }
}
