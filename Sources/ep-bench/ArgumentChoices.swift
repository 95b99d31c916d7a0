import ArgumentParser
import ExpertParallel
import Foundation

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

/// One `--sms` value: an SM count or a comma-separated list of them (`--sms 16,32,66,132`).
struct SMCounts: ExpressibleByArgument {
    var counts: [Int]

    init?(argument: String) {
        var counts: [Int] = []
        for piece in argument.split(separator: ",", omittingEmptySubsequences: false) {
            guard let count = Int(piece.trimmingCharacters(in: .whitespaces)) else { return nil }
            counts.append(count)
        }
        self.counts = counts
    }
}

extension Algorithm {
    /// LL or HT, as the tables and errors write it.
    var shortName: String { self == .lowLatency ? "LL" : "HT" }
}
