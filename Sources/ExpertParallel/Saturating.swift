/// Int arithmetic that saturates instead of trapping: a configuration's derived sizes
/// (`GroupConfig.receiveCapacity`, ...) are asked of configurations `validated()` has not checked
/// (or has refused), whose products may leave Int. Within the bounds of `validated()` they never
/// saturate.
package enum Saturating {
    /// `a × b`, or Int.max / Int.min (by the product's sign) where it leaves Int.
    package static func product(_ a: Int, _ b: Int) -> Int {
        let (p, overflow) = a.multipliedReportingOverflow(by: b)
        return overflow ? ((a < 0) != (b < 0) ? .min : .max) : p
    }

    /// Every value multiplied, saturating as `product(_:_:)` does at each step.
    package static func product(_ a: Int, _ b: Int, _ c: Int) -> Int { product(product(a, b), c) }

    /// `a + b`, or Int.max / Int.min where it leaves Int.
    package static func sum(_ a: Int, _ b: Int) -> Int {
        let (s, overflow) = a.addingReportingOverflow(b)
        return overflow ? (a > 0 ? .max : .min) : s
    }
}
