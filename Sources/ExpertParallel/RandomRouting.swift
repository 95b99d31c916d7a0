import Foundation

/// Reproducible routings and payloads for benchmarks and tests (docs/ep-bench.md, "Standard
/// cases, bytes and the floor"): each token picks K distinct experts uniformly (the top K of
/// uniform random scores), weights are uniform in (0, 1); `skew` > 0 concentrates the picks on
/// the first experts.
///
/// A count out of range (negative, `topK` above `experts`, an expert id past int32) throws
/// `invalidArgument` naming it; a result larger than this host's memory throws `outOfMemory`,
/// before anything is allocated.
public struct RandomRouting: Sendable {
    public var state: UInt64

    public init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }

    /// SplitMix64.
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    public mutating func unit() -> Float { Float(next() >> 40) / Float(1 << 24) }

    /// Largest `experts`: the ids are int32.
    public static let maxExperts = Int(Int32.max)

    /// `[tokens, topK]` expert ids, K distinct per token. With `skew` > 0, expert e's score is
    /// multiplied by (1 + skew)^(-e / E · 8), favouring low ids. `tokens` ≥ 0, `experts` in
    /// 0...`maxExperts`, `topK` in 0...`experts`. Each token draws one score per expert (the
    /// work is tokens × experts: a few ns each) and keeps the K best, ties to the lower id.
    public mutating func experts(tokens: Int, topK: Int, experts: Int, skew: Double = 0) throws(EPError) -> [Int32] {
        try Self.require("tokens", tokens, atLeast: 0)
        try Self.require("experts", experts, atLeast: 0)
        guard experts <= Self.maxExperts else {
            throw .invalidArgument(field: "experts", value: "\(experts)", requirement: "must be ≤ \(Self.maxExperts) (expert ids are int32)")
        }
        try Self.require("topK", topK, atLeast: 0)
        guard topK <= experts else {
            throw .invalidArgument(field: "topK", value: "\(topK)", requirement: "must be ≤ experts (\(experts)): a token's K experts are distinct")
        }
        let skewed = skew > 0 && tokens > 0 && topK > 0
        try Self.checkMemory("the routing's \(tokens) × \(topK) int32 expert ids", [tokens, topK], elementBytes: 4,
                             plus: skewed ? experts * 4 : 0)
        var result: [Int32] = []
        result.reserveCapacity(tokens * topK)
        // The K best so far, best first: a score beats one it is greater than (a later id never
        // beats an equal score), as a sort of every score would order them.
        var best = [(Float, Int32)](repeating: (0, 0), count: topK)
        // Each expert's skew factor, the same for every token: worked out once.
        let factors = skewed ? (0..<experts).map { e in Float(pow(1 + skew, -Double(e) / Double(experts) * 8)) } : []
        for _ in 0..<tokens {
            var kept = 0
            for e in 0..<experts {
                var score = unit()
                if skewed { score *= factors[e] }
                guard topK > 0, kept < topK || score > best[topK - 1].0 else { continue }
                var place = min(kept, topK - 1)
                while place > 0 && score > best[place - 1].0 {
                    best[place] = best[place - 1]
                    place -= 1
                }
                best[place] = (score, Int32(e))
                kept = min(kept + 1, topK)
            }
            result.append(contentsOf: best.lazy.map(\.1))
        }
        return result
    }

    /// `count` weights uniform in (0, 1); `count` ≥ 0.
    public mutating func weights(_ count: Int) throws(EPError) -> [Float] {
        try Self.require("count", count, atLeast: 0)
        try Self.checkMemory("\(count) float32 weights", [count], elementBytes: 4)
        return (0..<count).map { _ in max(unit(), 1e-3) }
    }

    /// `count` payload elements uniform in [-1, 1), encoded as `type` (raw bit patterns); `count` ≥ 0.
    public mutating func payload(_ count: Int, _ type: DataType) throws(EPError) -> [UInt8] {
        try Self.require("count", count, atLeast: 0)
        try Self.checkMemory("\(count) \(type) payload elements", [count], elementBytes: type.byteSize)
        var bytes = [UInt8](repeating: 0, count: count * type.byteSize)
        bytes.withUnsafeMutableBytes { raw in
            for i in 0..<count {
                let v = unit() * 2 - 1
                switch type {
                case .bf16: raw.storeBytes(of: ElementConversion.floatToBF16(v), toByteOffset: i * 2, as: UInt16.self)
                case .f16: raw.storeBytes(of: ElementConversion.floatToF16(v), toByteOffset: i * 2, as: UInt16.self)
                case .f32: raw.storeBytes(of: v, toByteOffset: i * 4, as: Float.self)
                default: raw[i * type.byteSize] = UInt8(truncatingIfNeeded: next())
                }
            }
        }
        return bytes
    }

    private static func require(_ field: String, _ value: Int, atLeast bound: Int) throws(EPError) {
        guard value >= bound else { throw .invalidArgument(field: field, value: "\(value)", requirement: "must be ≥ \(bound)") }
    }

    /// Refuses, with `outOfMemory`, a result of `shape` × `elementBytes` bytes (and `plus` bytes
    /// of scratch: the skew factors) past this host's memory (or past Int.max), before it is allocated.
    private static func checkMemory(_ what: String, _ shape: [Int], elementBytes: Int, plus scratch: Int = 0) throws(EPError) {
        let available = Int(clamping: ProcessInfo.processInfo.physicalMemory)
        let bytes = TensorRef.checkedProduct(shape, times: elementBytes).map { $0.addingReportingOverflow(scratch) }
        guard let bytes, !bytes.overflow, bytes.partialValue <= available else {
            throw .outOfMemory(buffer: what, bytes: bytes.map { $0.overflow ? .max : $0.partialValue } ?? .max, available: available)
        }
    }
}
