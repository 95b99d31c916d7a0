import ExpertParallel

/// The benchmark's own checks of a result, independent of the library: combine against
/// x·Σ_k w_k (or x·destination ranks) computed here, and (u8, which has no combine) dispatch
/// against the rows every destination must hold.
extension BenchData {
    /// Compares every combined element with its expectation within the element type's rounding.
    func validate(rank: Int, config: GroupConfig, combined: HostTensor) -> Bool {
        let routing = routings[rank], k = config.topK, l = config.localExperts
        let weighted = config.layout == .expertMajor || config.isExpertMajorHT
        let x = tokens[rank]
        let tolerance = Self.tolerance(config.elementType)
        for t in 0..<routing.tokens {
            var factor: Float = 0
            if weighted {
                for c in 0..<k where routing.expert(t, c) >= 0 { factor += weights[rank][as: Float.self, t * k + c] }
            } else {
                factor = Float(Set((0..<k).compactMap { routing.expert(t, $0) >= 0 ? routing.expert(t, $0) / l : nil }).count)
            }
            for i in 0..<config.hidden {
                let expected = factor * Self.element(x, t * config.hidden + i)
                let actual = Self.element(combined, t * config.hidden + i)
                if !(abs(actual - expected) <= tolerance * (factor + 1)) { return false }
            }
        }
        return true
    }

    /// Checks rank `destination`'s received rows as a multiset: every row a source sent it (once
    /// per selection in the expert-major layouts, once per (token, rank) pair in rank-major and
    /// flat) is there as many times, and nothing else but rows of zeros (unused slots, padding).
    func validateDispatch(rank destination: Int, config: GroupConfig, received: HostTensor) -> Bool {
        let rowBytes = config.rowBytes, l = config.localExperts
        let perSelection = config.layout == .expertMajor || config.isExpertMajorHT
        var expected: [[UInt8]: Int] = [:]
        for source in 0..<config.ranks {
            let routing = routings[source]
            for t in 0..<routing.tokens {
                let selections = (0..<routing.topK).filter { routing.expert(t, $0) >= 0 && routing.expert(t, $0) / l == destination }.count
                let copies = perSelection ? selections : min(selections, 1)
                let row = Self.row(tokens[source], t, rowBytes)
                if copies > 0, row.contains(where: { $0 != 0 }) { expected[row, default: 0] += copies }
            }
        }
        for slot in 0..<(received.byteCount / rowBytes) {
            let row = Self.row(received, slot, rowBytes)
            guard row.contains(where: { $0 != 0 }) else { continue }
            guard let count = expected[row], count > 0 else { return false }
            expected[row] = count - 1
        }
        return expected.values.allSatisfy { $0 == 0 }
    }

    private static func row(_ tensor: HostTensor, _ index: Int, _ rowBytes: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: tensor.storage + index * rowBytes, count: rowBytes))
    }

    static func element(_ tensor: HostTensor, _ index: Int) -> Float {
        switch tensor.dtype {
        case .bf16: ElementConversion.bf16ToFloat(tensor[as: UInt16.self, index])
        case .f16: ElementConversion.f16ToFloat(tensor[as: UInt16.self, index])
        case .f32: tensor[as: Float.self, index]
        default: Float(tensor[as: UInt8.self, index])
        }
    }

    /// Per unit of Σ w + 1: the rounding of the result to the type (and of partial sums to it).
    private static func tolerance(_ type: DataType) -> Float {
        switch type {
        case .bf16: 0.02
        case .f16: 0.004
        default: 1e-5
        }
    }
}
