import ExpertParallel
import ExpertParallelCUDA

/// Extra `-D` constants for the step kernels from `EP_KERNEL_DEFINES` (`NAME=value,NAME=value`),
/// for trying a kernel variant's compile-time switches on a GPU machine without rebuilding the
/// library. Only the switches below, each within its range, are taken: anything else (a misspelt
/// name that would measure the default under another cache key, a shape or contract constant, a
/// value that would not compile) is a named error. The constants enter the kernel cache key, so
/// a variant is compiled once and cached apart from the default.
enum KernelDefineOverrides {
    static let variable = "EP_KERNEL_DEFINES"

    /// The switches that can be tried, and their values (docs/performance.md, "Trying a kernel variant").
    static let switches: [(name: String, values: ClosedRange<Int>)] = [
        ("EP_COMBINE_SPAN", 1...8),       // HT combine: vectors of each row a lane loads at once
        ("EP_COMBINE_ADAPTIVE", 0...1),   // HT flat combine: 8 loads in flight whatever a token's row count
        ("EP_COMBINE_FEW_ROWS", 0...8),   // HT flat combine: tokens of at most this many rows take EP_COMBINE_FEW_SPAN (default 2)
        ("EP_COMBINE_FEW_SPAN", 1...8),   // HT flat combine: vectors of each row a lane loads at once for those tokens (default 2)
        ("EP_SOLO_VECS", 1...16),         // one-rank flat HT combine: vectors a lane has in flight
        ("EP_LL_AHEAD", 0...1),           // LL dispatch: a piece's first vectors load with its row lookups (default 1)
        ("EP_LL_SOLO_UPDATE", 0...1),     // LL update at R = 1: the rank's totals stay in shared memory, no all-gather (default 1)
        ("EP_FP8_IN_FLIGHT", 1...4),      // FP8 quantised in the kernel: chunks of 512 elements a warp loads at once (default 2)
        ("EP_FP8_AHEAD", 1...4),          // the same, LL: chunks loaded before the row lookups (default: the host's choice, 2 to 4)
        ("EP_DEST_GROUP", 1...8),         // dispatch: destinations whose addresses a lane reads before its stores to them (default 1)
        ("EP_PREFETCH_PIECE", 0...1),     // LL dispatch: the rest of a piece is fetched into L2 with its first units (default 1)
        ("EP_ROW_LOADS", 0...2),          // rows' loads: 0 read-only path (LL's default), 1 L2 only (HT's), 2 through L1
        ("EP_LL_OWN_ROWS", 0...1),        // LL update + dispatch launch: dispatch blocks find their rows themselves (default 1)
        ("EP_HT_STAGE", 0...1),           // HT update: routing and count table read again from shared memory where they fit (default 1)
        ("EP_HT_BULK", 0...1),            // HT dispatch: rows moved by the bulk-copy engine (TMA) where it can (default 0)
    ]

    static var switchList: String { switches.map { "\($0.name) \($0.values.lowerBound)...\($0.values.upperBound)" }.joined(separator: ", ") }

    /// The overrides in `text` (nil or empty: none); `reserved`: the names the group sets itself.
    static func parse(_ text: String?, reserved: Set<String>) throws(EPError) -> [String: String] {
        guard let text, !text.isEmpty else { return [:] }
        var defines: [String: String] = [:]
        for entry in text.split(separator: ",", omittingEmptySubsequences: false) {
            let parts = entry.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            func fail(_ requirement: String) -> EPError {
                .invalidArgument(field: variable, value: String(entry), requirement: requirement)
            }
            guard parts.count == 2 else { throw fail("entries are NAME=value, separated by commas") }
            let name = String(parts[0]), digits = String(parts[1])
            guard let range = switches.first(where: { $0.name == name })?.values, !reserved.contains(name) else {
                throw fail("the name must be one of the switches that can be tried: \(switchList)")
            }
            guard digits.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), let value = Int(digits), range.contains(value),
                  digits == String(value) else {
                throw fail("\(name) takes a decimal integer in \(range.lowerBound)...\(range.upperBound)")
            }
            guard defines[name] == nil else { throw fail("\(name) is given twice") }
            defines[name] = digits
        }
        return defines
    }
}

/// The kernel variant a process compiles its step kernels as, for a benchmark's record.
public enum KernelVariant {
    /// `EP_KERNEL_DEFINES` as the step kernels take it: its switches sorted by name
    /// (`NAME=value,...`), its text as given where it is not valid (every compile then fails with
    /// the entry and the rule), nil where it is unset or empty (the default kernels).
    public static var defines: String? { normalized(Environment.value(KernelDefineOverrides.variable)) }

    static func normalized(_ text: String?) -> String? {
        guard let text, !text.isEmpty else { return nil }
        guard let defines = try? KernelDefineOverrides.parse(text, reserved: []) else { return text }
        return defines.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
    }
}
