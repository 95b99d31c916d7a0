/// A set of ranks (the active-rank mask). Ranks are at most 64 per group.
public struct RankMask: Sendable, Hashable, CustomStringConvertible {
    public var bits: UInt64

    public init(bits: UInt64) { self.bits = bits }
    /// Ranks 0..<`ranks` (none for `ranks` ≤ 0, all 64 for `ranks` ≥ 64).
    public static func all(_ ranks: Int) -> RankMask {
        RankMask(bits: ranks >= 64 ? ~0 : ranks <= 0 ? 0 : (UInt64(1) << UInt64(ranks)) - 1)
    }

    public func contains(_ rank: Int) -> Bool { rank >= 0 && rank < 64 && bits & (1 << UInt64(rank)) != 0 }
    /// Adds `rank`; a rank outside 0..<64 is not in any mask and is ignored.
    public mutating func insert(_ rank: Int) {
        guard rank >= 0 && rank < 64 else { return }
        bits |= 1 << UInt64(rank)
    }
    /// Removes `rank`; a rank outside 0..<64 is ignored.
    public mutating func remove(_ rank: Int) {
        guard rank >= 0 && rank < 64 else { return }
        bits &= ~(1 << UInt64(rank))
    }
    public var count: Int { bits.nonzeroBitCount }
    public var ranks: [Int] { (0..<64).filter { contains($0) } }
    public var description: String { "\(ranks)" }
}
