import ArgumentParser

/// `--name value` must lie in `bounds` (nil: the option was not given). The message names the
/// option, the value and the bound; a `ValidationError` is ArgumentParser's usage status, 64.
func checkRange(_ name: String, _ value: Int?, _ bounds: ClosedRange<Int>) throws {
    guard let value, !bounds.contains(value) else { return }
    throw ValidationError("\(name) \(value) is out of range: must be in \(bounds.lowerBound)...\(bounds.upperBound)")
}
