import ExpertParallel
import Testing

/// Every malformed call is rejected with an error naming the argument, the value found and the
/// bound. (That a rejected call writes nothing is in `FailedCallTests`.)
@Suite("Call validation")
struct CallValidationTests {
    /// Checks an `invalidArgument` error and its message.
    static func expectInvalidArgument(
        _ error: EPError?, field: String, value: String, bound: String, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        guard case let .invalidArgument(f, v, requirement)? = error else {
            Issue.record("expected invalidArgument(\(field)), got \(String(describing: error))", sourceLocation: sourceLocation)
            return
        }
        #expect(f == field, sourceLocation: sourceLocation)
        #expect(v == value, sourceLocation: sourceLocation)
        #expect(requirement.contains(bound), "requirement: \(requirement)", sourceLocation: sourceLocation)
        let message = error!.description
        #expect(message.contains(field) && message.contains(value) && message.contains(bound), "message: \(message)",
                sourceLocation: sourceLocation)
    }

    // MARK: Routing (update)

    struct RoutingCase: Sendable, CustomTestStringConvertible {
        var name: String
        var dtype: DataType = .i32
        var shape: [Int] = [2, 2]
        var values: [Int64] = [0, 1, 2, 3]
        var tweak: @Sendable (TensorRef) -> TensorRef = { $0 }
        var field: String, value: String, bound: String
        var testDescription: String { name }
    }

    static let routingCases: [RoutingCase] = [
        RoutingCase(name: "int32 entry equal to E", values: [0, 1, 4, 0], field: "topkIdx[1][0]", value: "4", bound: "-1 or in [0, 4)"),
        RoutingCase(name: "int32 entry below -1", values: [0, -2, 1, 2], field: "topkIdx[0][1]", value: "-2", bound: "-1 or in [0, 4)"),
        RoutingCase(name: "int32 minimum", values: [Int64(Int32.min), 1, 2, 3], field: "topkIdx[0][0]", value: "-2147483648", bound: "[0, 4)"),
        RoutingCase(name: "int64 entry equal to E", dtype: .i64, values: [0, 1, 2, 4], field: "topkIdx[1][1]", value: "4", bound: "-1 or in [0, 4)"),
        RoutingCase(name: "int64 entry beyond int32 (not truncated)", dtype: .i64, values: [0, 1, 2, 1 << 33], field: "topkIdx[1][1]", value: "8589934592", bound: "[0, 4)"),
        RoutingCase(name: "int64 entry that truncates to a valid id", dtype: .i64, values: [(1 << 32) + 1, 0, 2, 3], field: "topkIdx[0][0]", value: "4294967297", bound: "[0, 4)"),
        RoutingCase(name: "int64 entry below -1", dtype: .i64, values: [0, 1, -9, 3], field: "topkIdx[1][0]", value: "-9", bound: "-1 or in [0, 4)"),
        RoutingCase(name: "more tokens than maxTokensPerRank", shape: [5, 2], values: Array(repeating: -1, count: 10),
                    field: "topkIdx.shape[0] (tokens)", value: "5", bound: "maxTokensPerRank (4)"),
        RoutingCase(name: "K columns mismatch", shape: [2, 3], values: [0, 1, 2, 3, -1, -1], field: "topkIdx.shape", value: "[2, 3]", bound: "topK = 2"),
        RoutingCase(name: "one-dimensional", shape: [4], values: [0, 1, 2, 3], field: "topkIdx.shape", value: "[4]", bound: "[tokens, topK = 2]"),
        RoutingCase(name: "float dtype", dtype: .f32, values: [0, 0, 0, 0], field: "topkIdx.dtype", value: "f32", bound: "i32 or i64"),
        RoutingCase(name: "nil address", tweak: { $0.withoutAddress }, field: "topkIdx.address", value: "nil", bound: "non-nil for 4 elements"),
        RoutingCase(name: "column-major strides", tweak: { $0.with(strides: [1, 2]) }, field: "topkIdx.strides", value: "[1, 2]", bound: "contiguous"),
        RoutingCase(name: "device memory", tweak: { $0.with(location: .device(0)) }, field: "topkIdx.location", value: "device(0)", bound: "host"),
    ]

    @Test("update rejects a malformed topkIdx, naming the entry or field, the value and the bound", arguments: routingCases)
    func updateRejectsRouting(_ c: RoutingCase) throws {
        let fixture = try CallFixture(.htFlat)
        let tensor = try HostTensor(c.dtype, c.shape)
        for (i, v) in c.values.enumerated() {
            switch c.dtype {
            case .i64: tensor[as: Int64.self, i] = v
            case .i32: tensor[as: Int32.self, i] = Int32(v)
            default: tensor[as: Float.self, i] = Float(v)
            }
        }
        let error = #expect(throws: EPError.self) { try fixture.rank.update(fixture.handle, topkIdx: c.tweak(tensor.ref)) }
        Self.expectInvalidArgument(error, field: c.field, value: c.value, bound: c.bound)
    }

    @Test("update rejects an expert repeated in a token's row, naming the token, both columns and the expert", arguments: [DataType.i32, .i64])
    func updateRejectsRepeatedExpert(_ dtype: DataType) throws {
        let fixture = try CallFixture(.llExpertMajor, topK: 3)
        let rows: [Int64] = [0, 1, 2, /* token 1: */ 3, -1, 3]
        let tensor = try HostTensor(dtype, [2, 3])
        for (i, v) in rows.enumerated() {
            if dtype == .i32 { tensor[as: Int32.self, i] = Int32(v) } else { tensor[as: Int64.self, i] = v }
        }
        let error = #expect(throws: EPError.self) { try fixture.rank.update(fixture.handle, topkIdx: tensor.ref) }
        #expect(error == .repeatedExpert(token: 1, firstColumn: 0, secondColumn: 2, expert: 3))
        let message = error?.description ?? ""
        #expect(message.contains("token 1") && message.contains("columns 0 and 2") && message.contains("expert 3"), "message: \(message)")
    }

    @Test("-1 may repeat within a row")
    func minusOneMayRepeat() throws {
        let fixture = try CallFixture(.htFlat, topK: 3)
        let tensor = try HostTensor(.i32, [1, 3])
        try tensor.copy(from: [Int32(-1), 2, -1])
        try fixture.rank.update(fixture.handle, topkIdx: tensor.ref)
    }

    // MARK: Dispatch

    struct DispatchCase: Sendable, CustomTestStringConvertible {
        var name: String
        var kinds: [LayoutKind]
        var mutate: @Sendable (CallFixture, inout DispatchInput, inout DispatchOutput) throws -> Void
        var field: String, value: String, bound: String
        var testDescription: String { name }
    }

    static let dispatchCases: [DispatchCase] = [
        DispatchCase(name: "input.tokens with more rows than the routing", kinds: LayoutKind.allCases,
                     mutate: { f, i, _ in i.tokens = try f.scratch(.bf16, [3, 8]) }, field: "input.tokens.shape", value: "[3, 8]", bound: "must be [2, 8]"),
        DispatchCase(name: "input.tokens of another element type", kinds: LayoutKind.allCases,
                     mutate: { f, i, _ in i.tokens = try f.scratch(.f16, [2, 8]) }, field: "input.tokens.dtype", value: "f16", bound: "must be bf16"),
        DispatchCase(name: "input.tokens without memory", kinds: [.llExpertMajor, .htFlat],
                     mutate: { _, i, _ in i.tokens = i.tokens.withoutAddress }, field: "input.tokens.address", value: "nil", bound: "non-nil for 16 elements"),
        DispatchCase(name: "LL expert-major output.tokens of the rank-major shape", kinds: [.llExpertMajor],
                     mutate: { f, _, o in o.tokens = try f.scratch(.bf16, [1, 4, 8]) }, field: "output.tokens.shape", value: "[1, 4, 8]", bound: "must be [4, 4, 8]"),
        DispatchCase(name: "rank-major output.tokens of the expert-major shape", kinds: [.llRankMajor],
                     mutate: { f, _, o in o.tokens = try f.scratch(.bf16, [4, 4, 8]) }, field: "output.tokens.shape", value: "[4, 4, 8]", bound: "must be [1, 4, 8]"),
        DispatchCase(name: "HT output.tokens one row short", kinds: [.htFlat],
                     mutate: { f, _, o in o.tokens = try f.scratch(.bf16, [3, 8]) }, field: "output.tokens.shape", value: "[3, 8]", bound: "must be [4, 8]"),
        DispatchCase(name: "output.tokens transposed strides", kinds: [.htFlat, .htExpertMajor],
                     mutate: { _, _, o in o.tokens = o.tokens.with(strides: [1, o.tokens.shape[0]]) }, field: "output.tokens.strides", value: "", bound: "contiguous"),
        DispatchCase(name: "output.tokens on a device", kinds: LayoutKind.allCases,
                     mutate: { _, _, o in o.tokens = o.tokens.with(location: .device(1)) }, field: "output.tokens.location", value: "device(1)", bound: "must be host"),
        DispatchCase(name: "missing input.topkWeights", kinds: [.llRankMajor, .htFlat, .htExpertMajor],
                     mutate: { _, i, _ in i.topkWeights = nil }, field: "input.topkWeights", value: "nil", bound: "required"),
        DispatchCase(name: "input.topkWeights with three columns", kinds: [.llExpertMajor, .llRankMajor],
                     mutate: { f, i, _ in i.topkWeights = try f.scratch(.f32, [2, 3]) }, field: "input.topkWeights.shape", value: "[2, 3]", bound: "must be [2, 2]"),
        DispatchCase(name: "input.topkWeights in bf16", kinds: [.llExpertMajor, .htFlat],
                     mutate: { f, i, _ in i.topkWeights = try f.scratch(.bf16, [2, 2]) }, field: "input.topkWeights.dtype", value: "bf16", bound: "must be f32"),
        DispatchCase(name: "missing output.topkIdx", kinds: [.llRankMajor, .htFlat, .htExpertMajor],
                     mutate: { _, _, o in o.topkIdx = nil }, field: "output.topkIdx", value: "nil", bound: "required"),
        DispatchCase(name: "missing output.topkWeights", kinds: [.llRankMajor, .htFlat, .htExpertMajor],
                     mutate: { _, _, o in o.topkWeights = nil }, field: "output.topkWeights", value: "nil", bound: "required"),
        DispatchCase(name: "output.topkIdx in f32", kinds: [.htFlat],
                     mutate: { f, _, o in o.topkIdx = try f.scratch(.f32, [4, 2]) }, field: "output.topkIdx.dtype", value: "f32", bound: "must be i32 or i64"),
        DispatchCase(name: "output.topkWeights in f16", kinds: [.llRankMajor],
                     mutate: { f, _, o in o.topkWeights = try f.scratch(.f16, [1, 4, 2]) }, field: "output.topkWeights.dtype", value: "f16", bound: "must be f32"),
        DispatchCase(name: "HT expert-major output.topkIdx per column instead of per slot", kinds: [.htExpertMajor],
                     mutate: { f, _, o in o.topkIdx = try f.scratch(.i32, [o.tokens.shape[0], 2]) }, field: "output.topkIdx.shape", value: "", bound: "must be ["),
        DispatchCase(name: "flat output.topkWeights per slot instead of per column", kinds: [.htFlat],
                     mutate: { f, _, o in o.topkWeights = try f.scratch(.f32, [4]) }, field: "output.topkWeights.shape", value: "[4]", bound: "must be [4, 2]"),
    ]

    static var dispatchArguments: [(DispatchCase, LayoutKind)] { dispatchCases.flatMap { c in c.kinds.map { (c, $0) } } }

    @Test("dispatch rejects a malformed tensor, naming it, its value and the bound", arguments: dispatchArguments)
    func dispatchRejectsTensor(_ c: DispatchCase, _ kind: LayoutKind) throws {
        let fixture = try CallFixture(kind)
        var (input, output) = fixture.goodDispatch
        try c.mutate(fixture, &input, &output)
        let error = #expect(throws: EPError.self) { _ = try fixture.rank.dispatch(fixture.handle, input, into: output, direction: .forward) }
        let value = c.value.isEmpty ? Self.valueOf(error) : c.value
        Self.expectInvalidArgument(error, field: c.field, value: value, bound: c.bound)
    }

    /// For cases whose value depends on the layout's capacity: take it from the error, but still
    /// require it to be in the message.
    static func valueOf(_ error: EPError?) -> String {
        if case let .invalidArgument(_, value, _)? = error { value } else { "?" }
    }

    // MARK: Combine

    struct CombineCase: Sendable, CustomTestStringConvertible {
        var name: String
        var kinds: [LayoutKind]
        var direction: PassDirection
        var mutate: @Sendable (CallFixture, inout CombineInput, inout CombineOutput) throws -> Void
        var field: String, value: String, bound: String
        var testDescription: String { name }
    }

    static let combineCases: [CombineCase] = [
        CombineCase(name: "expertOutputs of the wrong shape", kinds: LayoutKind.allCases, direction: .forward,
                    mutate: { f, i, _ in i.expertOutputs = try f.scratch(.bf16, [2, 8]) }, field: "input.expertOutputs.shape", value: "[2, 8]", bound: "must be ["),
        CombineCase(name: "expertOutputs of another element type", kinds: [.llExpertMajor, .htFlat], direction: .backward,
                    mutate: { f, i, _ in i.expertOutputs = try f.scratch(.f32, i.expertOutputs.shape) }, field: "input.expertOutputs.dtype", value: "f32", bound: "must be bf16"),
        CombineCase(name: "output.tokens with more rows than the routing", kinds: LayoutKind.allCases, direction: .forward,
                    mutate: { f, _, o in o.tokens = try f.scratch(.bf16, [3, 8]) }, field: "output.tokens.shape", value: "[3, 8]", bound: "must be [2, 8]"),
        CombineCase(name: "output.tokens without memory", kinds: [.llRankMajor], direction: .forward,
                    mutate: { _, _, o in o.tokens = o.tokens.withoutAddress }, field: "output.tokens.address", value: "nil", bound: "non-nil"),
        CombineCase(name: "LL expert-major forward without the source's weights", kinds: [.llExpertMajor], direction: .forward,
                    mutate: { _, i, _ in i.topkWeights = nil }, field: "input.topkWeights", value: "nil", bound: "required"),
        CombineCase(name: "LL expert-major forward weights with three columns", kinds: [.llExpertMajor], direction: .forward,
                    mutate: { f, i, _ in i.topkWeights = try f.scratch(.f32, [2, 3]) }, field: "input.topkWeights.shape", value: "[2, 3]", bound: "must be [2, 2]"),
        CombineCase(name: "HT expert-major forward without the per-slot weights", kinds: [.htExpertMajor], direction: .forward,
                    mutate: { _, i, _ in i.topkWeights = nil }, field: "input.topkWeights", value: "nil", bound: "required"),
        CombineCase(name: "HT expert-major forward weights per token instead of per slot", kinds: [.htExpertMajor], direction: .forward,
                    mutate: { f, i, _ in i.topkWeights = try f.scratch(.f32, [2, 2]) }, field: "input.topkWeights.shape", value: "[2, 2]", bound: "must be ["),
        CombineCase(name: "HT backward without weightGradients", kinds: LayoutKind.highThroughput, direction: .backward,
                    mutate: { _, i, _ in i.weightGradients = nil }, field: "input.weightGradients", value: "nil", bound: "required"),
        CombineCase(name: "HT expert-major backward weightGradients per column", kinds: [.htExpertMajor], direction: .backward,
                    mutate: { f, i, _ in i.weightGradients = try f.scratch(.f32, [i.expertOutputs.shape[0], 2]) }, field: "input.weightGradients.shape", value: "", bound: "must be ["),
        CombineCase(name: "HT backward without output.topkWeightGradients", kinds: LayoutKind.highThroughput, direction: .backward,
                    mutate: { _, _, o in o.topkWeightGradients = nil }, field: "output.topkWeightGradients", value: "nil", bound: "required"),
        CombineCase(name: "HT backward output.topkWeightGradients with three columns", kinds: [.htFlat], direction: .backward,
                    mutate: { f, _, o in o.topkWeightGradients = try f.scratch(.f32, [2, 3]) }, field: "output.topkWeightGradients.shape", value: "[2, 3]", bound: "must be [2, 2]"),
    ]

    static var combineArguments: [(CombineCase, LayoutKind)] { combineCases.flatMap { c in c.kinds.map { (c, $0) } } }

    @Test("combine rejects a malformed tensor, naming it, its value and the bound", arguments: combineArguments)
    func combineRejectsTensor(_ c: CombineCase, _ kind: LayoutKind) throws {
        let fixture = try CallFixture(kind)
        _ = try fixture.rank.dispatch(fixture.handle, fixture.goodDispatch.0, into: fixture.goodDispatch.1, direction: c.direction)
        var (input, output) = fixture.goodCombine(c.direction)
        try c.mutate(fixture, &input, &output)
        let error = #expect(throws: EPError.self) { try fixture.rank.combine(fixture.handle, input, into: output, direction: c.direction) }
        let value = c.value.isEmpty ? Self.valueOf(error) : c.value
        Self.expectInvalidArgument(error, field: c.field, value: value, bound: c.bound)
    }

    @Test("combine refuses raw-byte (u8) payloads, which dispatch accepts")
    func combineRefusesRawBytes() throws {
        let fixture = try CallFixture(.htFlat, type: .u8)
        _ = try fixture.rank.dispatch(fixture.handle, fixture.goodDispatch.0, into: fixture.goodDispatch.1, direction: .forward)
        let (input, output) = fixture.goodCombine(.forward)
        let error = #expect(throws: EPError.self) { try fixture.rank.combine(fixture.handle, input, into: output, direction: .forward) }
        guard case let .invalidConfig(field, value, requirement)? = error else {
            Issue.record("expected invalidConfig, got \(String(describing: error))")
            return
        }
        #expect(field == "elementType" && value == "u8" && requirement.contains("bf16, f16 or f32"))
    }

    @Test("LL expert-major dispatch does not write topkIdx/topkWeights outputs, which its layout does not define (or rejects them)")
    func expertMajorLLLeavesUndefinedRoutingOutputsAlone() throws {
        let fixture = try CallFixture(.llExpertMajor)
        var (input, output) = fixture.goodDispatch
        input.topkWeights = fixture.harness.weights[0].ref
        let slots = fixture.config.receiveShape.dropLast().reduce(1, *)
        let idx = try HostTensor(.i32, [slots]), weights = try HostTensor(.f32, [slots])
        idx.fill(byte: StepHarness.poison)
        weights.fill(byte: StepHarness.poison)
        output.topkIdx = idx.ref
        output.topkWeights = weights.ref
        do {
            let result = Result { () throws(EPError) in try fixture.rank.dispatch(fixture.handle, input, into: output, direction: .forward) }
            if case .failure(let error) = result {
                guard case let .invalidArgument(field, _, _) = error else { Issue.record("unexpected \(error)"); return }
                #expect(field.hasPrefix("output.topk"), "rejected, naming \(field)")
                return
            }
            #expect(idx.bytes().allSatisfy { $0 == StepHarness.poison }, "topkIdx written")
            #expect(weights.bytes().allSatisfy { $0 == StepHarness.poison }, "topkWeights written")
        }
    }

    // MARK: Order and ownership

    @Test("dispatch and combine before the first update report wrongOrder on every rank")
    func callsBeforeUpdateAreOutOfOrder() throws {
        let harness = try StepHarness(HandWorkedExample.scenario(.htFlat))
        for (_, result) in harness.dispatch() {
            #expect(throws: EPError.wrongOrder("dispatch and combine need a handle updated with this step's topkIdx first")) { try result.get() }
        }
        for (_, result) in harness.combine() {
            #expect(throws: EPError.wrongOrder("dispatch and combine need a handle updated with this step's topkIdx first")) { try result.get() }
        }
        for r in 0..<2 { expectMatch(Verify.untouched(harness, rank: r), harness.scenario) }
    }

    @Test("a rank refuses another rank's handle in update, dispatch and combine")
    func anotherRanksHandleIsRefused() throws {
        let harness = try StepHarness(HandWorkedExample.scenario(.llExpertMajor))
        let rank0 = try harness.group[0], foreign = harness.handles[1]
        let errors: [EPError?] = [
            #expect(throws: EPError.self) { try rank0.update(foreign, topkIdx: harness.topkIdx[0].ref) },
            #expect(throws: EPError.self) { _ = try rank0.dispatch(foreign, harness.dispatchInput(0), into: harness.dispatchOutput(0), direction: .forward) },
            #expect(throws: EPError.self) { try rank0.combine(foreign, harness.combineInput(0, .forward), into: harness.combineOutput(0, .forward), direction: .forward) },
        ]
        for error in errors { Self.expectInvalidArgument(error, field: "handle", value: "handle of rank 1", bound: "rank 0's own handle") }
        expectMatch(Verify.untouched(harness, rank: 0), harness.scenario)
    }
}
