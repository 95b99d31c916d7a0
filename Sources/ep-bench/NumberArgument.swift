import Foundation

/// The numeric options' own parsers (ArgumentParser's `transform:`), so that text that is no
/// number of the option's type is refused with the option's bound: ArgumentParser prints
/// "The value 'TEXT' is invalid for '--option <option>': " and then the error's description.
/// The range itself is checked in `validate()` (`checkRange`), which names the value.
enum NumberArgument {
    struct Refusal: Error, CustomStringConvertible {
        var description: String
    }

    /// A whole number, in decimal digits with an optional sign.
    static func whole(_ bounds: ClosedRange<Int>) -> @Sendable (String) throws -> Int {
        whole(bound: "in \(bounds.lowerBound)...\(bounds.upperBound)")
    }

    /// The same, the bound written as the range check writes it after "must be" (`≥ 0`,
    /// `in 0..<the ranks`).
    static func whole(bound: String) -> @Sendable (String) throws -> Int {
        { text in
            if let value = Int(text) { return value }
            throw Refusal(description: refusal(text, bound))
        }
    }

    /// An unsigned 64-bit whole number (the seed).
    static let unsigned: @Sendable (String) throws -> UInt64 = { text in
        if let value = UInt64(text) { return value }
        throw Refusal(description: refusal(text, "in 0...\(UInt64.max)"))
    }

    /// A floating-point number (nan and inf parse, for the range check to name them).
    static func real(_ bounds: ClosedRange<Double>) -> @Sendable (String) throws -> Double {
        { text in
            if let value = Double(text) { return value }
            throw Refusal(description: "must be a number in \(bounds.lowerBound)...\(bounds.upperBound)")
        }
    }

    /// Whole numbers separated by commas (`--tokens 16,64,256`), blanks around each allowed.
    static func wholeList(_ bounds: ClosedRange<Int>) -> @Sendable (String) throws -> [Int] {
        { text in
            let items = text.split(separator: ",", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
            let bound = "in \(bounds.lowerBound)...\(bounds.upperBound)"
            return try items.enumerated().map { index, item in
                if let value = Int(item) { return value }
                if items.count == 1 { throw Refusal(description: refusal(item, bound)) }
                let problem = item.isEmpty ? "is empty" : isDigits(item) ? "(\(item)) is out of range" : "(\(item)) is not a whole number"
                throw Refusal(description: "item \(index + 1) of \(items.count) \(problem): "
                    + "give whole numbers in \(bounds.lowerBound)...\(bounds.upperBound), separated by commas")
            }
        }
    }

    /// Why `text` is no whole number of the option: digits past its type's range, or no digits.
    private static func refusal(_ text: String, _ bound: String) -> String {
        isDigits(text) ? "out of range: must be \(bound)" : "must be a whole number \(bound)"
    }

    /// Decimal digits with an optional sign: a whole number, if too large for its type.
    private static func isDigits(_ text: String) -> Bool {
        let digits = text.first == "-" || text.first == "+" ? text.dropFirst() : Substring(text)
        return !digits.isEmpty && digits.allSatisfy { $0.isASCII && $0.isNumber }
    }
}
