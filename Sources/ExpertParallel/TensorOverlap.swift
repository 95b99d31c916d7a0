/// A call writes its outputs while it reads its inputs (and a host group's ranks write into each
/// other's outputs at once): an output that shares a byte with an input or with another output
/// would silently corrupt the one or the other, so it is refused, naming both tensors and their
/// bytes. Inputs may share memory with each other (they are only read).
enum TensorOverlap {
    /// Refuses the first overlap of tensor `i < outputs` with a tensor `j > i` (of `0..<all`);
    /// `tensor(i)` gives the tensor and its name (the first `outputs` are the outputs). Allocates
    /// nothing.
    static func refuse(outputs: Int, all: Int, _ tensor: (Int) -> (TensorRef?, String)) throws(EPError) {
        for i in 0..<outputs {
            let (output, outputName) = tensor(i)
            guard let output, let (outputBytes, place) = span(output) else { continue }
            for j in (i + 1)..<all {
                let (other, otherName) = tensor(j)
                guard let other, let (otherBytes, location) = span(other), location == place, outputBytes.overlaps(otherBytes) else { continue }
                throw overlap(output, outputName, other, otherName)
            }
        }
    }

    /// `output` (named `outputName`) shares bytes with `other`.
    static func overlap(_ output: TensorRef, _ outputName: String, _ other: TensorRef, _ otherName: String) -> EPError {
        .invalidArgument(
            field: "\(outputName).address", value: "\(output.address!) (\(output.byteCount) bytes)",
            requirement: "\(requirementPrefix)\(otherName) (\(other.address!), \(other.byteCount) bytes): an output may share no byte with an input or another output")
    }

    /// How an overlap's requirement starts; the name after it is renamed with the field
    /// (`EPError.renamingField`).
    package static let requirementPrefix = "must not overlap "
}

extension CallShapes {
    /// A dispatch's outputs against its inputs and each other.
    func refuseOverlaps(_ input: DispatchInput, _ output: DispatchOutput) throws(EPError) {
        try TensorOverlap.refuse(outputs: Self.dispatchOutputs, all: Self.dispatchArguments) { Self.dispatchArgument(input, output, $0) }
    }

    /// A combine's outputs against its inputs and each other.
    func refuseOverlaps(_ input: CombineInput, _ output: CombineOutput) throws(EPError) {
        try TensorOverlap.refuse(outputs: Self.combineOutputs, all: Self.combineArguments) { Self.combineArgument(input, output, $0) }
    }

    /// A dispatch's tensors and their names, the outputs first.
    package static let dispatchOutputs = 6, dispatchArguments = 9
    package static func dispatchArgument(_ input: DispatchInput, _ output: DispatchOutput, _ i: Int) -> (TensorRef?, String) {
        switch i {
        case 0: (output.tokens, "output.tokens")
        case 1: (output.topkIdx, "output.topkIdx")
        case 2: (output.topkWeights, "output.topkWeights")
        case 3: (output.scales, "output.scales")
        case 4: (output.expertCounts, "output.expertCounts")
        case 5: (output.expertSourceCounts, "output.expertSourceCounts")
        case 6: (input.tokens, "input.tokens")
        case 7: (input.topkWeights, "input.topkWeights")
        default: (input.scales, "input.scales")
        }
    }

    /// A combine's tensors and their names, the outputs first.
    package static let combineOutputs = 2, combineArguments = 5
    package static func combineArgument(_ input: CombineInput, _ output: CombineOutput, _ i: Int) -> (TensorRef?, String) {
        switch i {
        case 0: (output.tokens, "output.tokens")
        case 1: (output.topkWeightGradients, "output.topkWeightGradients")
        case 2: (input.expertOutputs, "input.expertOutputs")
        case 3: (input.topkWeights, "input.topkWeights")
        default: (input.weightGradients, "input.weightGradients")
        }
    }
}

extension EPError {
    /// `requirement` with the tensor an overlap names (`must not overlap input.tokens (...)`)
    /// renamed as `field(_:renaming:parts:)` renames a field; any other requirement as it is.
    static func renamingOverlap(_ requirement: String, _ names: [(from: String, to: String)], parts: [(from: String, to: String)]) -> String {
        guard let match = requirement.firstMatch(of: /must not overlap (\w+(?:\[rank \d+\])?(?:\.\w+)*)/) else { return requirement }
        return requirement.replacingCharacters(
            in: match.1.startIndex..<match.1.endIndex, with: field(String(match.1), renaming: names, parts: parts))
    }
}

extension TensorOverlap {
    /// The first ranks (r, s) whose part r of array `a` shares a byte with part s of array `b`
    /// (part r of `start` at `start + r * stride`, `bytes` long; `parts` parts each), or nil.
    /// Exact arithmetic (Int128): the addresses are the caller's word, whatever they are.
    static func firstOverlap(_ a: (start: UInt64, bytes: Int, stride: Int), _ b: (start: UInt64, bytes: Int, stride: Int), parts: Int) -> (Int, Int)? {
        // (Its caller compared the arrays' hulls first: only intersecting ones come here.)
        let bStart = Int128(b.start), bBytes = Int128(b.bytes), bStride = Int128(max(b.stride, 1))
        func floorDiv(_ x: Int128, _ y: Int128) -> Int128 { x >= 0 ? x / y : -((-x + y - 1) / y) }
        for r in 0..<parts {
            let x = Int128(a.start) + Int128(r) * Int128(a.stride)
            // Part s starts before x + a.bytes and ends after x.
            let lo = max(0, floorDiv(x - bBytes - bStart, bStride) + 1), hi = min(Int128(parts - 1), floorDiv(x + Int128(a.bytes) - 1 - bStart, bStride))
            if lo <= hi { return (r, Int(lo)) }
        }
        return nil
    }
}

extension StackedStrides {
    /// Refuses an output array (fields from `firstOutput` on) one of whose parts, of any rank,
    /// shares a byte with a part of another array (one part's bytes are `bytes(field)`, as the
    /// strides were checked for, over `parts` parts; `part(field)`: the array, asked only to name
    /// a refusal). Every rank's parts are written and read at once. The arrays' hulls were found
    /// with the strides (`hull(_:)`): the given ones are compared in pairs, disjoint hulls (separate
    /// tensors, every call not in error) in two comparisons, intersecting ones part by part
    /// (`firstOverlap`). Allocates nothing.
    func refuseOverlaps(parts: Int, firstOutput: Int, _ part: (Field) -> StackedTensor) throws(EPError) {
        let fields = count
        // The given arrays (non-empty hulls) first, in field order, on the stack: the pairs then
        // visit only those (an LL expert-major dispatch: 15 pairs, not 54).
        let found: (a: Int, r: Int, b: Int, s: Int)? = withUnsafeTemporaryAllocation(
            of: (low: UInt64, high: UInt64, place: Int, raw: Int).self, capacity: fields
        ) { given in
            var n = 0
            for raw in 0..<fields {
                let (low, high, place) = hull(raw)
                guard low < high else { continue }
                (given.baseAddress! + n).initialize(to: (low, high, place, raw))
                n += 1
            }
            // Output i against every given array after it, and every input before it.
            for i in 0..<n where given[i].raw >= firstOutput {
                let a = given[i]
                for j in 0..<n where j != i && (j > i || given[j].raw < firstOutput) {
                    let b = given[j]
                    guard a.low < b.high, b.low < a.high, a.place == b.place, let fieldA = Field(rawValue: a.raw), let fieldB = Field(rawValue: b.raw),
                          let (r, s) = TensorOverlap.firstOverlap((a.low, bytes(fieldA), self[fieldA]), (b.low, bytes(fieldB), self[fieldB]), parts: parts)
                    else { continue }
                    return (a.raw, r, b.raw, s)
                }
            }
            return nil
        }
        guard let (i, r, j, s) = found, let a = Field(rawValue: i), let b = Field(rawValue: j) else { return }
        let ta = part(a), tb = part(b)
        func at(_ t: StackedTensor, _ rank: Int, _ field: Field) -> String {
            "rank \(rank)'s part at 0x\(String(address(t, field, rank: rank), radix: 16))"
        }
        throw .invalidArgument(
            field: "\(a).address", value: "\(at(ta, r, a)) (\(bytes(a)) bytes)",
            requirement: "\(TensorOverlap.requirementPrefix)\(b) (\(at(tb, s, b)), \(bytes(b)) bytes): an output may share no byte with an input or another output")
    }
}
