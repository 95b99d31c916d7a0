import ArgumentParser
import ExpertParallel

/// `--layout`: the four receive layouts, two per algorithm (README, "Two algorithms, four layouts").
enum LayoutChoice: String, ExpressibleByArgument, CaseIterable {
    case expertMajor = "expert-major"
    case rankMajor = "rank-major"
    case flat
    case expertMajorPadded = "expert-major-padded"

    var algorithm: Algorithm {
        switch self {
        case .expertMajor, .rankMajor: .lowLatency
        case .flat, .expertMajorPadded: .highThroughput
        }
    }

    func layout(alignment: Int) -> Layout {
        switch self {
        case .expertMajor: .expertMajor
        case .rankMajor: .rankMajor
        case .flat: .flat
        case .expertMajorPadded: .expertMajorPadded(alignment: alignment)
        }
    }

    /// The layouts of `algorithm`, as the option spells them.
    static func names(of algorithm: Algorithm) -> String {
        allCases.filter { $0.algorithm == algorithm }.map(\.rawValue).joined(separator: ", ")
    }
}

/// `--dtype`: the token element types. u8 is dispatch only (combine needs a floating type).
enum DTypeChoice: String, ExpressibleByArgument, CaseIterable {
    case bf16, f16, f32, u8

    var dataType: DataType {
        switch self {
        case .bf16: .bf16
        case .f16: .f16
        case .f32: .f32
        case .u8: .u8
        }
    }
}

extension Algorithm {
    /// LL or HT, as the tables and errors write it.
    var shortName: String { self == .lowLatency ? "LL" : "HT" }
}

/// `--fp8`: FP8 dispatch with this scale mode (docs/fp8.md); combine stays in `--dtype`.
enum FP8Choice: String, ExpressibleByArgument, CaseIterable {
    case float32, ue8m0, e8m0

    var mode: FP8ScaleMode {
        switch self {
        case .float32: .float32Block128
        case .ue8m0: .ue8m0Block128
        case .e8m0: .e8m0Block32
        }
    }

    /// The option's name of a scale mode (tables and JSON).
    static func name(of mode: FP8ScaleMode) -> String {
        allCases.first { $0.mode == mode }!.rawValue
    }
}

/// `--fp8-source`: the dispatch quantises the `--dtype` rows, or moves e4m3 rows and scales
/// made beforehand (outside the timing) unchanged.
enum FP8SourceChoice: String, ExpressibleByArgument, CaseIterable {
    case quantize
    case passThrough = "pass-through"

    var source: FP8Dispatch.Source { self == .quantize ? .quantize : .passThrough }

    static func name(of source: FP8Dispatch.Source) -> String { source == .quantize ? "quantize" : "pass-through" }
}

/// A choice option's value that remembers whether the command line gave it: its default until
/// it does. Declared with this default (not as an optional with the default written in its help),
/// ArgumentParser writes the option's help as it writes `--backend`'s, one "(values: …; default: …)",
/// and a run can still refuse the option where given (`--dtype bf16` with `--drill`).
struct Defaulted<Choice>: ExpressibleByArgument
where Choice: ExpressibleByArgument & CaseIterable & RawRepresentable, Choice.RawValue == String {
    var value: Choice
    /// The value where the command line gave it; nil where it is the default.
    var given: Choice?

    init(_ value: Choice) {
        self.value = value
        given = nil
    }

    init?(argument: String) {
        guard let value = Choice(argument: argument) else { return nil }
        self.value = value
        given = value
    }

    var defaultValueDescription: String { value.rawValue }
    static var allValueStrings: [String] { Choice.allValueStrings }
    static var defaultCompletionKind: CompletionKind { Choice.defaultCompletionKind }
}
