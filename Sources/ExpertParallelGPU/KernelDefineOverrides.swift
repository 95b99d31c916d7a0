import ExpertParallel
import ExpertParallelCUDA

/// Extra `-D` constants for the step kernels from `EP_KERNEL_DEFINES` (`NAME=value,NAME=value`),
/// for trying a kernel variant's compile-time switches (`EP_COMBINE_SPAN`, `EP_SOLO_VECS`...) on
/// a GPU machine without rebuilding the library. Names are `EP_` followed by capitals, digits or
/// underscores, values non-negative integers; a name the group itself sets (shape, tuning, the
/// Swift/CUDA contract) cannot be overridden. The constants enter the kernel cache key, so a
/// variant is compiled once and cached apart from the default.
enum KernelDefineOverrides {
    static let variable = "EP_KERNEL_DEFINES"

    /// The overrides in `text` (nil or empty: none), checked against `reserved`, the names the
    /// group sets.
    static func parse(_ text: String?, reserved: Set<String>) throws(EPError) -> [String: String] {
        guard let text, !text.isEmpty else { return [:] }
        var defines: [String: String] = [:]
        for entry in text.split(separator: ",", omittingEmptySubsequences: false) {
            let parts = entry.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            func fail(_ requirement: String) -> EPError {
                .invalidArgument(field: variable, value: String(entry), requirement: requirement)
            }
            guard parts.count == 2 else { throw fail("entries are NAME=value, separated by commas") }
            let name = String(parts[0]), value = String(parts[1])
            guard name.hasPrefix("EP_"), name.count > 3,
                  name.utf8.allSatisfy({ ($0 >= 65 && $0 <= 90) || ($0 >= 48 && $0 <= 57) || $0 == 95 }) else {
                throw fail("the name must be EP_ followed by capitals, digits or underscores")
            }
            guard !value.isEmpty, value.count <= 9, value.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) else {
                throw fail("the value must be a non-negative integer of at most 9 digits")
            }
            guard !reserved.contains(name) else { throw fail("\(name) is set by the group (shape, tuning or contract)") }
            guard defines[name] == nil else { throw fail("\(name) is given twice") }
            defines[name] = value
        }
        return defines
    }

    static func fromEnvironment(reserved: Set<String>) throws(EPError) -> [String: String] {
        try parse(Environment.value(variable), reserved: reserved)
    }
}
