/// Every rank's part of one call argument in one array: rank r's part starts `rankStride` bytes
/// after rank r − 1's. The stacked calls take their arguments this way (one description per
/// argument instead of one per rank and argument), which is what callers that keep their ranks'
/// tensors in one `[R, ...]` array have anyway.
public struct StackedTensor: Sendable, Equatable {
    /// Rank 0's part; 0: not given.
    public var address: UInt64
    public var dtype: DataType
    public var location: MemoryLocation
    /// Bytes from one rank's part to the next; 0: the parts are packed (each part's own size).
    public var rankStride: Int

    public init(address: UInt64, dtype: DataType, location: MemoryLocation, rankStride: Int = 0) {
        self.address = address
        self.dtype = dtype
        self.location = location
        self.rankStride = rankStride
    }

    /// One part: `tensor`'s memory (a call of one rank).
    public init(_ tensor: TensorRef) {
        self.init(address: UInt64(UInt(bitPattern: tensor.address)), dtype: tensor.dtype, location: tensor.location)
    }

    /// Rank `rank`'s part, `shape` shaped, as a view (the checks read rank 0's, at `address`
    /// whatever the shape). The others' addresses wrap rather than trap: parts that do not fit in
    /// 64 bits are refused by `stride(...)`, which a call's checks run before any other part is used.
    public func part(_ rank: Int, shape: [Int]) -> TensorRef {
        var base = UInt(address)
        if rank != 0 {
            let step = rankStride != 0 ? rankStride : shape.reduce(1, &*) &* dtype.byteSize
            base &+= UInt(bitPattern: rank &* step)
        }
        return TensorRef(address: UnsafeMutableRawPointer(bitPattern: base), dtype: dtype, shape: shape, location: location)
    }

    /// The byte stride between parts of `elements` elements (`shape`), after checking it: 0 means
    /// packed; a given stride must hold a part and keep every part `alignment`-aligned, as rank
    /// 0's address must be. The name and the shape are built only for an error: the data path
    /// allocates nothing for them. `alignment` and `ranks` must be ≥ 1, `elements` ≥ 0.
    public func stride(_ name: @autoclosure () -> String, elements: Int, shape: @autoclosure () -> [Int], alignment: Int, ranks: Int) throws(EPError) -> Int {
        guard alignment >= 1 else { throw .invalidArgument(field: "alignment", value: "\(alignment)", requirement: "must be ≥ 1") }
        guard ranks >= 1 else { throw .invalidArgument(field: "ranks", value: "\(ranks)", requirement: "must be ≥ 1") }
        guard elements >= 0 else { throw .invalidArgument(field: "elements", value: "\(elements)", requirement: "must be ≥ 0") }
        let most = (1 << 62) / max(ranks, 1)   // every rank's address stays far inside 64 bits
        // A part is the group's shape (`elements` saturates at Int.max): packed or not, every
        // rank's part must fit below that bound (a given stride must be at least a part).
        let (bytes, overflow) = elements.multipliedReportingOverflow(by: dtype.byteSize)
        guard !overflow, bytes <= most else {
            let size = overflow || bytes > 1 << 62 ? "more than 2^62" : "\(bytes)"
            throw .invalidArgument(field: name(), value: "\(dtype)\(shape()) (\(size) bytes a part)",
                                   requirement: "must be at most \(most) bytes a part (2^62 / \(ranks) ranks): every rank's address stays far inside 64 bits")
        }
        guard rankStride >= 0, rankStride == 0 || rankStride >= bytes, rankStride <= most else {
            throw .invalidArgument(field: "\(name()).rankStride", value: "\(rankStride)",
                                   requirement: "must be 0 (packed) or in \(bytes)...\(most): at least the bytes of one rank's \(dtype)\(shape())")
        }
        let step = rankStride != 0 ? rankStride : bytes
        guard UInt64.max - address >= UInt64(step) * UInt64(ranks) else {
            throw .invalidArgument(field: "\(name()).address", value: "\(address)",
                                   requirement: "must leave room for \(ranks) parts of \(step) bytes below 2^64")
        }
        guard rankStride % alignment == 0 else {
            throw .invalidArgument(field: "\(name()).rankStride", value: "\(rankStride)", requirement: "must be a multiple of \(alignment) bytes")
        }
        guard address % UInt64(alignment) == 0 else {
            throw .invalidArgument(field: "\(name()).address", value: "\(address)", requirement: "must be a multiple of \(alignment) bytes")
        }
        return step
    }
}

/// A stacked dispatch: every rank sends `tokens` rows (the same B for every rank). With `topkIdx`
/// it is the step's update and its dispatch in one call; without, a dispatch of the step's
/// routing again (a backward dispatch: `tokens` must be the step's).
public struct StackedDispatch: Sendable {
    public var tokens: Int
    /// `[R][B, K]` int32 or int64 global expert ids, or nil.
    public var topkIdx: StackedTensor?
    /// `[R][B, H]` rows (the group's dispatch input type).
    public var inputs: StackedTensor
    /// `[R][B, K]` float32, as `DispatchInput.topkWeights`.
    public var topkWeights: StackedTensor?
    /// FP8 pass-through: `[R][B, scale words]`.
    public var scales: StackedTensor?
    /// `[R][receiveShape]`, and the other outputs as `DispatchOutput` has them, per rank.
    public var received: StackedTensor
    public var receivedTopkIdx: StackedTensor?
    public var receivedTopkWeights: StackedTensor?
    public var receivedScales: StackedTensor?
    public var expertCounts: StackedTensor?
    public var expertSourceCounts: StackedTensor?

    public init(
        tokens: Int, topkIdx: StackedTensor?, inputs: StackedTensor, topkWeights: StackedTensor? = nil, scales: StackedTensor? = nil,
        received: StackedTensor, receivedTopkIdx: StackedTensor? = nil, receivedTopkWeights: StackedTensor? = nil,
        receivedScales: StackedTensor? = nil, expertCounts: StackedTensor? = nil, expertSourceCounts: StackedTensor? = nil
    ) {
        self.tokens = tokens
        self.topkIdx = topkIdx
        self.inputs = inputs
        self.topkWeights = topkWeights
        self.scales = scales
        self.received = received
        self.receivedTopkIdx = receivedTopkIdx
        self.receivedTopkWeights = receivedTopkWeights
        self.receivedScales = receivedScales
        self.expertCounts = expertCounts
        self.expertSourceCounts = expertSourceCounts
    }
}

/// A stacked combine of a dispatched step: rank r's combined rows (as many as its routing has)
/// go to `combined`'s part r.
public struct StackedCombine: Sendable {
    /// `[R][receiveShape]` of the element type.
    public var expertOutputs: StackedTensor
    /// As `CombineInput.topkWeights`: LL expert-major forward `[R][B, K]`; HT expert-major
    /// forward the per-slot `[R][N]`.
    public var topkWeights: StackedTensor?
    /// Backward HT: `[R][receiveRoutingShape]`.
    public var weightGradients: StackedTensor?
    /// `[R][B, H]` outputs: rank r's rows at part r.
    public var combined: StackedTensor
    /// Backward HT outputs: `[R][B, K]` float32.
    public var topkWeightGradients: StackedTensor?

    public init(
        expertOutputs: StackedTensor, topkWeights: StackedTensor? = nil, weightGradients: StackedTensor? = nil,
        combined: StackedTensor, topkWeightGradients: StackedTensor? = nil
    ) {
        self.expertOutputs = expertOutputs
        self.topkWeights = topkWeights
        self.weightGradients = weightGradients
        self.combined = combined
        self.topkWeightGradients = topkWeightGradients
    }
}

/// A stacked call's per-rank arguments, checked: each rank's views (for backends that take them)
/// and the strides between ranks (for those that compute addresses). Rank 0's tensors go
/// through the same checks as a per-rank call's (same messages, without a rank prefix); every
/// rank's part has the same type, shape and place, so that checks them all, with the strides.
/// The checks first read the descriptions themselves (`CallShapes.passesDispatch`); only a call
/// that fails there builds the views and names what is wrong (the data path builds none).
public struct CheckedStackedDispatch: Sendable {
    public let call: StackedDispatch
    let shapes: CallShapes
    let strides: StackedStrides<Field>

    /// The fields that carry a tensor, in a fixed order.
    public enum Field: Int, CaseIterable, Sendable {
        case topkIdx, inputs, topkWeights, scales, received, receivedTopkIdx, receivedTopkWeights, receivedScales, expertCounts,
             expertSourceCounts

        /// The name a per-rank call's checks give this argument's view (`validateDispatch`).
        var viewName: String {
            switch self {
            case .topkIdx: "topkIdx"
            case .inputs: "input.tokens"
            case .topkWeights: "input.topkWeights"
            case .scales: "input.scales"
            case .received: "output.tokens"
            case .receivedTopkIdx: "output.topkIdx"
            case .receivedTopkWeights: "output.topkWeights"
            case .receivedScales: "output.scales"
            case .expertCounts: "output.expertCounts"
            case .expertSourceCounts: "output.expertSourceCounts"
            }
        }
    }

    public func stride(_ field: Field) -> Int { strides[field] }

    /// Rank `rank`'s address of `field` (0 where not given; wrapped, not trapped, for a rank
    /// outside the parts).
    public func address(_ field: Field, rank: Int) -> UInt64 { strides.address(call[field], field, rank: rank) }

    /// Rank 0's update routing (nil without topkIdx), as a view.
    public var topkIdx: TensorRef? { call.topkIdx.map { $0.part(0, shape: shapes.shape(.topkIdx, tokens: call.tokens)) } }

    /// Rank 0's dispatch input and output, as views.
    public var input: DispatchInput { Self.views(call, shapes).input }
    public var output: DispatchOutput { Self.views(call, shapes).output }

    /// `parts`: the ranks the arrays hold (default every rank of the group; an NCCL rank's call: 1).
    public init(_ call: StackedDispatch, shapes: CallShapes, location: MemoryLocation, stepTokens: Int?, parts: Int? = nil) throws(EPError) {
        let config = shapes.config
        if let parts, parts < 1 || parts > config.ranks {
            throw .invalidArgument(field: "parts", value: "\(parts)", requirement: "must be in 1...ranks (\(config.ranks))")
        }
        guard call.tokens >= 0, call.tokens <= config.maxTokensPerRank else {
            throw .invalidArgument(field: "tokens", value: "\(call.tokens)", requirement: "must be in 0...maxTokensPerRank (\(config.maxTokensPerRank))")
        }
        if call.topkIdx == nil, let stepTokens, stepTokens != call.tokens {
            throw .invalidArgument(field: "tokens", value: "\(call.tokens)", requirement: "must be the step's (\(stepTokens)) when no topkIdx is given")
        }
        self.call = call
        self.shapes = shapes
        let b = call.tokens
        if !shapes.passesDispatch(call, location: location) {
            // The checks of a per-rank call on rank 0's views: they name what is wrong (as this call's fields).
            do {
                if let idx = call.topkIdx.map({ $0.part(0, shape: shapes.shape(.topkIdx, tokens: b)) }) {
                    try TensorCheck.require(idx, Field.topkIdx.viewName, dtypes: [.i32, .i64], rows: b, columns: config.topK, location: location)
                }
                let views = Self.views(call, shapes)
                try shapes.validateDispatch(views.input, views.output, tokens: b, location: location)
            } catch {
                throw Self.naming(error)
            }
        }
        strides = try StackedStrides(ranks: parts ?? config.ranks) { field in
            call[field].map { ($0, shapes.elements(field, tokens: b), { shapes.shape(field, tokens: b) }, field == .inputs || field == .received) }
        }
        try strides.refuseOverlaps(parts: parts ?? config.ranks, firstOutput: Field.received.rawValue) { call[$0]! }
    }

    /// `error` of a per-rank call's checks with its views named as this call's fields.
    package static func naming(_ error: EPError) -> EPError { error.renamingField(Field.allCases.map { ($0.viewName, "\($0)") }) }

    private static func views(_ call: StackedDispatch, _ shapes: CallShapes) -> (input: DispatchInput, output: DispatchOutput) {
        func part(_ field: Field) -> TensorRef? { call[field].map { $0.part(0, shape: shapes.shape(field, tokens: call.tokens)) } }
        return (DispatchInput(tokens: part(.inputs)!, topkWeights: part(.topkWeights), scales: part(.scales)),
                DispatchOutput(tokens: part(.received)!, topkIdx: part(.receivedTopkIdx), topkWeights: part(.receivedTopkWeights),
                               expertCounts: part(.expertCounts), expertSourceCounts: part(.expertSourceCounts), scales: part(.receivedScales)))
    }

    /// Rank `rank`'s update routing (nil without topkIdx), dispatch input and output, as views.
    public func rank(_ rank: Int) -> (topkIdx: TensorRef?, input: DispatchInput, output: DispatchOutput) {
        func moved(_ view: TensorRef?, _ field: Field) -> TensorRef? {
            guard var view, view.address != nil else { return view }
            view.address = UnsafeMutableRawPointer(bitPattern: UInt(address(field, rank: rank)))
            return view
        }
        let zero = Self.views(call, shapes)   // rank 0's
        let input = DispatchInput(tokens: moved(zero.input.tokens, .inputs)!, topkWeights: moved(zero.input.topkWeights, .topkWeights),
                                  scales: moved(zero.input.scales, .scales))
        let output = DispatchOutput(
            tokens: moved(zero.output.tokens, .received)!, topkIdx: moved(zero.output.topkIdx, .receivedTopkIdx),
            topkWeights: moved(zero.output.topkWeights, .receivedTopkWeights), expertCounts: moved(zero.output.expertCounts, .expertCounts),
            expertSourceCounts: moved(zero.output.expertSourceCounts, .expertSourceCounts), scales: moved(zero.output.scales, .receivedScales))
        return (moved(topkIdx, .topkIdx), input, output)
    }
}

extension StackedDispatch {
    public subscript(field: CheckedStackedDispatch.Field) -> StackedTensor? {
        switch field {
        case .topkIdx: topkIdx
        case .inputs: inputs
        case .topkWeights: topkWeights
        case .scales: scales
        case .received: received
        case .receivedTopkIdx: receivedTopkIdx
        case .receivedTopkWeights: receivedTopkWeights
        case .receivedScales: receivedScales
        case .expertCounts: expertCounts
        case .expertSourceCounts: expertSourceCounts
        }
    }
}

/// A stacked combine's arguments, checked as `CheckedStackedDispatch` checks a dispatch's;
/// `tokens`: each rank's rows in the step (the parts are checked for the most).
public struct CheckedStackedCombine: Sendable {
    public let call: StackedCombine
    public let tokens: [Int]
    let shapes: CallShapes
    let strides: StackedStrides<Field>

    public enum Field: Int, CaseIterable, Sendable {
        case expertOutputs, topkWeights, weightGradients, combined, topkWeightGradients

        /// The name a per-rank call's checks give this argument's view (`validateCombine`).
        var viewName: String {
            switch self {
            case .expertOutputs: "input.expertOutputs"
            case .topkWeights: "input.topkWeights"
            case .weightGradients: "input.weightGradients"
            case .combined: "output.tokens"
            case .topkWeightGradients: "output.topkWeightGradients"
            }
        }
    }

    public func stride(_ field: Field) -> Int { strides[field] }

    /// Rank `rank`'s address of `field` (0 where not given; wrapped, not trapped, for a rank
    /// outside the parts).
    public func address(_ field: Field, rank: Int) -> UInt64 { strides.address(call[field], field, rank: rank) }

    /// Rank 0's combine input and output, as views (for the most tokens of any rank).
    public var input: CombineInput { Self.views(call, shapes, most: tokens.max() ?? 0).input }
    public var output: CombineOutput { Self.views(call, shapes, most: tokens.max() ?? 0).output }

    /// `tokens`: one entry per part (every rank of the group; an NCCL rank's call: its own), each
    /// in 0...maxTokensPerRank.
    public init(_ call: StackedCombine, tokens: [Int], direction: PassDirection, shapes: CallShapes, location: MemoryLocation) throws(EPError) {
        let config = shapes.config
        guard tokens.count >= 1, tokens.count <= config.ranks else {
            throw .invalidArgument(field: "tokens.count", value: "\(tokens.count)", requirement: "must be in 1...ranks (\(config.ranks)): one entry per part")
        }
        for (r, b) in tokens.enumerated() where b < 0 || b > config.maxTokensPerRank {
            throw .invalidArgument(field: "tokens[\(r)]", value: "\(b)", requirement: "must be in 0...maxTokensPerRank (\(config.maxTokensPerRank))")
        }
        try self.init(call, stepTokens: tokens, direction: direction, shapes: shapes, location: location)
    }

    /// `init(_:tokens:direction:shapes:location:)` for the engine's own callers, whose `tokens` are
    /// a dispatched step's row counts (its routing's: one per part, each in 0...maxTokensPerRank
    /// already): the bounds of `tokens` are not checked again on the data path.
    package init(_ call: StackedCombine, stepTokens tokens: [Int], direction: PassDirection, shapes: CallShapes, location: MemoryLocation) throws(EPError) {
        self.call = call
        self.tokens = tokens
        self.shapes = shapes
        let most = tokens.max() ?? 0
        if !shapes.passesCombine(call, tokens: most, direction: direction, location: location) {
            let views = Self.views(call, shapes, most: most)   // the per-rank checks on rank 0's views: they name what is wrong
            do {
                try shapes.validateCombine(views.input, views.output, tokens: most, direction: direction, location: location)
            } catch {
                throw Self.naming(error)
            }
        }
        strides = try StackedStrides(ranks: tokens.count) { field in
            call[field].map { ($0, shapes.elements(field, tokens: most), { shapes.shape(field, tokens: most) }, field == .expertOutputs || field == .combined) }
        }
        try strides.refuseOverlaps(parts: tokens.count, firstOutput: Field.combined.rawValue) { call[$0]! }
    }

    /// `error` of a per-rank call's checks with its views named as this call's fields.
    package static func naming(_ error: EPError) -> EPError { error.renamingField(Field.allCases.map { ($0.viewName, "\($0)") }) }

    private static func views(_ call: StackedCombine, _ shapes: CallShapes, most: Int) -> (input: CombineInput, output: CombineOutput) {
        func part(_ field: Field) -> TensorRef? { call[field].map { $0.part(0, shape: shapes.shape(field, tokens: most)) } }
        return (CombineInput(expertOutputs: part(.expertOutputs)!, topkWeights: part(.topkWeights), weightGradients: part(.weightGradients)),
                CombineOutput(tokens: part(.combined)!, topkWeightGradients: part(.topkWeightGradients)))
    }

    /// Rank `rank`'s combine input and output, as views (`tokens[rank]` rows; a rank outside the
    /// parts has none, and its addresses wrap as `address(_:rank:)`'s do).
    public func rank(_ rank: Int) -> (input: CombineInput, output: CombineOutput) {
        let b = tokens.indices.contains(rank) ? tokens[rank] : 0
        func moved(_ view: TensorRef?, _ field: Field, rows: Int? = nil) -> TensorRef? {
            guard var view else { return nil }
            if let rows { view.shape[0] = rows }
            if view.address != nil { view.address = UnsafeMutableRawPointer(bitPattern: UInt(address(field, rank: rank))) }
            return view
        }
        let (input, output) = Self.views(call, shapes, most: tokens.max() ?? 0)
        let weightRows: Int? = input.topkWeights?.shape.count == 2 ? b : nil
        return (CombineInput(expertOutputs: moved(input.expertOutputs, .expertOutputs)!, topkWeights: moved(input.topkWeights, .topkWeights, rows: weightRows),
                             weightGradients: moved(input.weightGradients, .weightGradients)),
                CombineOutput(tokens: moved(output.tokens, .combined, rows: b)!,
                              topkWeightGradients: moved(output.topkWeightGradients, .topkWeightGradients, rows: b)))
    }
}

extension StackedCombine {
    public subscript(field: CheckedStackedCombine.Field) -> StackedTensor? {
        switch field {
        case .expertOutputs: expertOutputs
        case .topkWeights: topkWeights
        case .weightGradients: weightGradients
        case .combined: combined
        case .topkWeightGradients: topkWeightGradients
        }
    }
}

/// The stride between ranks' parts of each argument of a stacked call, checked against rank 0's
/// view (`StackedTensor.stride`: rows move in 8-byte vectors, ids, weights, scales and counts
/// whole), by `Field`; and each rank's address from it, and the bytes of one part.
struct StackedStrides<Field: CaseIterable & RawRepresentable>: Sendable where Field.RawValue == Int {
    /// Per field, in blocks of `Field.allCases.count`: its stride; the bytes of one part (0 where
    /// not given); then, where given at an address other than 0, the bytes from its first part's
    /// start to its last part's end as a hull (`low`, `high`: bit patterns of UInt64; `low` is
    /// rank 0's address, `high` the top of the address space where the end overflows, which the
    /// checked strides rule out) and its place
    /// (-1 host, else the device ordinal): what the overlap check compares, found here once.
    private let values: [Int]
    /// `Field.allCases.count`.
    let count: Int

    /// `part(field)`: the argument, the elements of rank 0's part, its shape (for a message) and
    /// whether it holds rows; nil where not given.
    init(ranks: Int, _ part: (Field) -> (tensor: StackedTensor, elements: Int, shape: () -> [Int], rows: Bool)?) throws(EPError) {
        let count = Field.allCases.count
        var values = [Int](repeating: 0, count: 5 * count)
        for field in Field.allCases {
            guard let (tensor, elements, shape, rows) = part(field) else { continue }
            let stride = try tensor.stride("\(field)", elements: elements, shape: shape(), alignment: rows ? 8 : tensor.dtype.byteSize,
                                           ranks: ranks)
            let raw = field.rawValue, bytes = elements * tensor.dtype.byteSize
            values[raw] = stride
            values[count + raw] = bytes
            guard tensor.address != 0, bytes > 0 else { continue }
            let (span, spanOverflow) = UInt64(max(ranks - 1, 0)).multipliedReportingOverflow(by: UInt64(max(stride, 0)))
            let (extent, extentOverflow) = span.addingReportingOverflow(UInt64(bytes))
            let (high, highOverflow) = tensor.address.addingReportingOverflow(extent)
            let exact = !(spanOverflow || extentOverflow || highOverflow)
            values[2 * count + raw] = Int(bitPattern: UInt(tensor.address))   // (strides ≥ 0: no part starts before it)
            values[3 * count + raw] = Int(bitPattern: UInt(exact ? high : .max))
            values[4 * count + raw] = switch tensor.location { case .host: -1; case .device(let ordinal): ordinal }
        }
        self.values = values
        self.count = count
    }

    subscript(field: Field) -> Int { values[field.rawValue] }

    /// The bytes of one part of `field` (its elements for the call's rows; 0 where not given).
    func bytes(_ field: Field) -> Int { values[count + field.rawValue] }

    /// Field `raw`'s hull (`low..<high`; empty where not given, at address 0 or of no bytes), and place.
    func hull(_ raw: Int) -> (low: UInt64, high: UInt64, place: Int) {
        return (UInt64(UInt(bitPattern: values[2 * count + raw])), UInt64(UInt(bitPattern: values[3 * count + raw])), values[4 * count + raw])
    }

    /// Rank `rank`'s address of `tensor`, argument `field` (0 where not given). For a rank of the
    /// parts the strides were checked for it is exact; for any other it wraps rather than traps,
    /// as `StackedTensor.part` does.
    func address(_ tensor: StackedTensor?, _ field: Field, rank: Int) -> UInt64 {
        guard let tensor, tensor.address != 0 else { return 0 }
        return tensor.address &+ UInt64(bitPattern: Int64(rank &* values[field.rawValue]))
    }
}
