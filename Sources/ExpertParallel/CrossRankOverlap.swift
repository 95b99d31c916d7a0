/// A collective call (every rank's tensors in one call: the host group's, the virtual GPU group's)
/// runs its ranks at once: rank 0's writes race rank 1's reads when an output of one shares a
/// byte with a tensor of another. The per-rank checks (`CallShapes.refuseOverlaps`) see one rank
/// only; this sees them all, by sorting every given byte range of the call once and sweeping.
extension TensorOverlap {
    /// One argument of one rank: its bytes and where they are (`place`: -1 host, else the device
    /// ordinal), and which argument it is (`slot < outputs`: written).
    struct Span: Comparable {
        var place: Int
        var start: UInt
        var end: UInt
        var rank: Int
        var slot: Int
        static func < (a: Span, b: Span) -> Bool { (a.place, a.start) < (b.place, b.start) }
    }

    /// The bytes and place of `tensor`, nil where it has none (or where its size overflows: the
    /// per-rank checks refuse that shape).
    package static func span(_ tensor: TensorRef?) -> (bytes: Range<UInt>, location: MemoryLocation)? {
        guard let tensor, let address = tensor.address, let count = TensorRef.checkedProduct(tensor.shape, times: tensor.dtype.byteSize) else { return nil }
        let start = UInt(bitPattern: address), (end, overflow) = start.addingReportingOverflow(UInt(count))
        guard count > 0, !overflow else { return nil }
        return (start..<end, tensor.location)
    }

    /// Refuses the first argument written by a rank of a collective call that shares a byte with
    /// an argument (read or written) of another, or of its own where the per-rank checks do not
    /// look (arguments they do not know of, such as the step's routing). `ranks`: the ranks that
    /// take part; `slots` arguments each, the first `outputs` of them written; `argument(r, s)`:
    /// rank r's argument s (nil where not given); `name(r, s)` names it (asked only on refusal).
    /// Inputs may share bytes with each other. O(n log n) in the n arguments given; one
    /// temporary buffer (on the stack where small).
    package static func refuseAcrossRanks(
        _ ranks: some Collection<Int>, slots: Int, outputs: Int, argument: (Int, Int) -> (bytes: Range<UInt>, location: MemoryLocation)?,
        name: (Int, Int) -> String
    ) throws(EPError) {
        guard let (output, other) = firstAcrossRanks(ranks, slots: slots, outputs: outputs, argument: argument) else { return }
        throw .invalidArgument(
            field: "\(name(output.rank, output.slot)).address", value: "\(hex(output.start)) (\(output.end - output.start) bytes)",
            requirement: "\(requirementPrefix)\(name(other.rank, other.slot)) (\(hex(other.start)), \(other.end - other.start) bytes): an output may share no byte with an input or another output")
    }

    private static func hex(_ address: UInt) -> String { "0x" + String(address, radix: 16) }

    /// The first written span found to share bytes with another (the written one first), or nil.
    static func firstAcrossRanks(
        _ ranks: some Collection<Int>, slots: Int, outputs: Int, argument: (Int, Int) -> (bytes: Range<UInt>, location: MemoryLocation)?
    ) -> (Span, Span)? {
        withUnsafeTemporaryAllocation(of: Span.self, capacity: ranks.count * slots) { spans -> (Span, Span)? in
            var count = 0
            for r in ranks {
                for s in 0..<slots {
                    guard let (bytes, location) = argument(r, s), !bytes.isEmpty else { continue }
                    let place: Int = switch location { case .host: -1; case .device(let ordinal): ordinal }
                    (spans.baseAddress! + count).initialize(to: Span(place: place, start: bytes.lowerBound, end: bytes.upperBound, rank: r, slot: s))
                    count += 1
                }
            }
            var given = UnsafeMutableBufferPointer(rebasing: spans[0..<count])
            defer { given.deinitialize() }
            given.sort()
            // The span reaching furthest among those before (any, and written ones) on this place:
            // a span that starts before that end shares bytes with it.
            var furthest: Span?, furthestOutput: Span?
            for span in given {
                if let last = furthest, last.place != span.place { furthest = nil; furthestOutput = nil }
                if span.slot < outputs, let last = furthest, last.end > span.start {
                    return (span, last)
                }
                if span.slot >= outputs, let last = furthestOutput, last.end > span.start {
                    return (last, span)
                }
                if furthest.map({ span.end > $0.end }) ?? true { furthest = span }
                if span.slot < outputs, furthestOutput.map({ span.end > $0.end }) ?? true { furthestOutput = span }
            }
            return nil
        }
    }
}

extension CallShapes {
    /// A collective dispatch's outputs of each rank in `ranks` against every argument of the
    /// others (each rank's own are `validateDispatch`'s) and, where given, each rank's routing of
    /// the step (`routing(r)`: its bytes, which the device reads again until the step's last
    /// combine), named as entry r of the call's arrays (`outputs[0].tokens`, `inputs[1].tokens`,
    /// `the step's topkIdx[rank 1]`).
    package func refuseOverlaps(
        _ inputs: [DispatchInput], _ outputs: [DispatchOutput], ranks: some Collection<Int>, routing: RoutingBytes? = nil
    ) throws(EPError) {
        try refuseAcrossRanks(ranks, arguments: Self.dispatchArguments, outputs: Self.dispatchOutputs, routing: routing) { r, s in
            Self.dispatchArgument(inputs[r], outputs[r], s)
        }
    }

    /// A collective combine's outputs of each rank in `ranks` against every argument of the
    /// others and, where given, each rank's routing of the step.
    package func refuseOverlaps(
        _ inputs: [CombineInput], _ outputs: [CombineOutput], ranks: some Collection<Int>, routing: RoutingBytes? = nil
    ) throws(EPError) {
        try refuseAcrossRanks(ranks, arguments: Self.combineArguments, outputs: Self.combineOutputs, routing: routing) { r, s in
            Self.combineArgument(inputs[r], outputs[r], s)
        }
    }

    /// The two above: `arguments` tensors a rank (`argument(r, s)`: rank r's tensor s and its
    /// per-rank name), the first `outputs` written, then the step's routing where given.
    private func refuseAcrossRanks(
        _ ranks: some Collection<Int>, arguments n: Int, outputs: Int, routing: RoutingBytes?, _ argument: (Int, Int) -> (TensorRef?, String)
    ) throws(EPError) {
        try TensorOverlap.refuseAcrossRanks(
            ranks, slots: n + (routing == nil ? 0 : 1), outputs: outputs,
            argument: { r, s in s == n ? routing!.span(r) : TensorOverlap.span(argument(r, s).0) },
            name: { r, s in s == n ? RoutingBytes.name(rank: r) : Self.entry(argument(r, s).1, rank: r) })
    }

    /// A per-rank call's argument (`output.tokens`) as entry `rank` of a collective call's arrays (`outputs[0].tokens`).
    static func entry(_ name: String, rank: Int) -> String {
        guard let dot = name.firstIndex(of: ".") else { return name }
        return "\(name[..<dot])s[\(rank)]\(name[dot...])"
    }

    /// Whether `error` is a collective call's refusal of one rank's output over another's argument
    /// (`refuseOverlaps(_:_:ranks:)`): the call's, of no one rank.
    package static func isAcrossRanks(_ error: EPError) -> Bool {
        guard case let .invalidArgument(field, _, requirement) = error else { return false }
        return field.hasPrefix("outputs[") && requirement.hasPrefix(TensorOverlap.requirementPrefix)
    }
}

/// A step's routing as a GPU handle keeps it (the device reads it again until the step's last
/// combine, so no output of the step's calls may share its bytes): rank r's `[tokens(r), topK]`
/// ids of `indexBytes` each at `address(r)`, on `location`. (The host backend copies the routing
/// at the update and keeps no address.)
package struct RoutingBytes {
    package var location: MemoryLocation
    package var topK: Int
    package var indexBytes: Int
    package var rows: (Int) -> (address: UInt64, tokens: Int)

    package init(location: MemoryLocation, topK: Int, indexBytes: Int, rows: @escaping (Int) -> (address: UInt64, tokens: Int)) {
        self.location = location
        self.topK = topK
        self.indexBytes = indexBytes
        self.rows = rows
    }

    func span(_ r: Int) -> (bytes: Range<UInt>, location: MemoryLocation)? {
        let (address, tokens) = rows(r)
        let start = UInt(address), (end, overflow) = start.addingReportingOverflow(UInt(max(tokens, 0) * topK * indexBytes))
        guard address != 0, !overflow else { return nil }
        return (start..<end, location)
    }

    /// Rank r's routing, as the device's status names it (`topkIdx[rank r]`; a collective C call's `inputs[r].topkIdx`).
    static func name(rank: Int) -> String { "the step's topkIdx[rank \(rank)]" }

    /// Refuses one rank's output (`outputs` of them; `output(i)`: the tensor and its name) over
    /// that rank's routing (`rank`, named `the step's topkIdx`): a call of one rank (an NCCL rank's).
    package func refuseOverlaps(rank: Int, outputs: Int, _ output: (Int) -> (TensorRef?, String)) throws(EPError) {
        guard let (routing, place) = span(rank) else { return }
        for i in 0..<outputs {
            let (tensor, name) = output(i)
            guard let (bytes, location) = TensorOverlap.span(tensor), location == place, bytes.overlaps(routing) else { continue }
            throw .invalidArgument(
                field: "\(name).address", value: "0x\(String(bytes.lowerBound, radix: 16)) (\(bytes.count) bytes)",
                requirement: "\(TensorOverlap.requirementPrefix)the step's topkIdx (0x\(String(routing.lowerBound, radix: 16)), \(routing.count) bytes): the device reads it again until the step's last combine")
        }
    }
}

extension RoutingBytes {
    /// Refuses a stacked call's output part, of any rank, over any rank's routing of the step:
    /// `outputs` output arrays, `output(i)`: one part's bytes, rank 0's part's address (0: not
    /// given) and the stride between parts (rank r's part at `address + r * stride`); `name(i)`
    /// names array i (asked only on refusal). Named `received[rank 1]`.
    func refuseOverlaps(
        parts: Int, outputs: Int, _ output: (Int) -> (bytes: Int, address: UInt64, stride: Int), name: (Int) -> String
    ) throws(EPError) {
        // The hulls first (each array's parts are evenly spaced): an output array whose bytes
        // over every part miss the routing's over every rank (separate tensors: every call not
        // in error) needs no sort, so the data path pays a few comparisons.
        var low = UInt.max, high: UInt = 0
        for r in 0..<parts {
            guard let (bytes, _) = span(r) else { continue }
            low = min(low, bytes.lowerBound)
            high = max(high, bytes.upperBound)
        }
        guard low < high, parts > 0 else { return }
        let touches = (0..<outputs).contains { s in
            let (bytes, address, stride) = output(s), first = UInt(address), last = UInt(address &+ UInt64(parts - 1) &* UInt64(stride))
            guard first != 0, bytes > 0 else { return false }
            return min(first, last) < high && low < max(first, last) &+ UInt(bytes)
        }
        guard touches else { return }
        try TensorOverlap.refuseAcrossRanks(
            0..<parts, slots: outputs + 1, outputs: outputs,
            argument: { r, s in
                guard s < outputs else { return span(r) }
                let (bytes, address, stride) = output(s)
                guard address != 0, bytes > 0 else { return nil }
                let start = UInt(address &+ UInt64(r) &* UInt64(stride))
                return (start..<start &+ UInt(bytes), location)
            },
            name: { r, s in s < outputs ? "\(name(s))[rank \(r)]" : Self.name(rank: r) })
    }
}

extension StackedStrides {
    /// A stacked call's output arrays (fields from `firstOutput` on; `tensor(field)`, nil where
    /// not given) refused where a part shares bytes with the step's routing (`routing`), which
    /// the device reads until the step's last combine.
    func refuseOverlaps(_ routing: RoutingBytes, parts: Int, firstOutput: Int, _ tensor: (Field) -> StackedTensor?) throws(EPError) {
        try routing.refuseOverlaps(parts: parts, outputs: count - firstOutput) { i in
            let field = Field(rawValue: firstOutput + i)!
            return (bytes(field), address(tensor(field), field, rank: 0), self[field])
        } name: { "\(Field(rawValue: firstOutput + $0)!)" }
    }
}

extension CheckedStackedDispatch {
    /// A dispatch of the step again (no topkIdx: the backward pass) refused where an output part
    /// shares bytes with the step's routing.
    package func refuseOverlaps(_ routing: RoutingBytes, parts: Int) throws(EPError) {
        try strides.refuseOverlaps(routing, parts: parts, firstOutput: Field.received.rawValue) { call[$0] }
    }
}

extension CheckedStackedCombine {
    /// A combine refused where an output part shares bytes with the step's routing.
    package func refuseOverlaps(_ routing: RoutingBytes) throws(EPError) {
        try strides.refuseOverlaps(routing, parts: tokens.count, firstOutput: Field.combined.rawValue) { call[$0] }
    }
}
