import Foundation

/// Reproducible routings and payloads for benchmarks and tests (docs/ep-bench.md, "Standard
/// cases, bytes and the floor"): each token picks K distinct experts uniformly (the top K of
/// uniform random scores), weights are uniform in (0, 1); `skew` > 0 concentrates the picks on
/// the first experts.
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

    /// `[tokens, topK]` expert ids, K distinct per token. With `skew` > 0, expert e's score is
    /// multiplied by (1 + skew)^(-e / E · 8), favouring low ids.
    public mutating func experts(tokens: Int, topK: Int, experts: Int, skew: Double = 0) -> [Int32] {
        var result: [Int32] = []
        result.reserveCapacity(tokens * topK)
        var scores = [(Float, Int32)](repeating: (0, 0), count: experts)
        for _ in 0..<tokens {
            for e in 0..<experts {
                var score = unit()
                if skew > 0 { score *= Float(pow(1 + skew, -Double(e) / Double(experts) * 8)) }
                scores[e] = (score, Int32(e))
            }
            scores.sort { $0.0 > $1.0 || ($0.0 == $1.0 && $0.1 < $1.1) }
            result.append(contentsOf: scores.prefix(topK).map(\.1))
        }
        return result
    }

    /// `count` weights uniform in (0, 1).
    public mutating func weights(_ count: Int) -> [Float] { (0..<count).map { _ in max(unit(), 1e-3) } }

    /// `count` payload elements uniform in [-1, 1), encoded as `type` (raw bit patterns).
    public mutating func payload(_ count: Int, _ type: DataType) -> [UInt8] {
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
}
