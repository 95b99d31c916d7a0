import ExpertParallel

/// A one-rank group of a given layout whose handle is updated with a valid routing
/// (B = 2 tokens, E = 4, K = 2, H = 8, bf16, Bmax = 4, alignment 4), plus a scratch area for
/// the malformed tensors a test passes instead of the good ones.
final class CallFixture: @unchecked Sendable {
    let harness: StepHarness
    private var scratchTensors: [HostTensor] = []

    init(_ kind: LayoutKind, topK: Int = 2, type: DataType = .bf16) throws {
        let scenario = Scenario.make(kind, ranks: 1, localExperts: 4, topK: topK, hidden: 8, type: type, maxTokens: 4,
                                     tokenCounts: [2]) { _, t, k in Int32((t + k) % 4) }
        harness = try StepHarness(scenario)
        for (_, result) in harness.update() { try result.get() }
    }

    var config: GroupConfig { harness.config }
    var rank: HostRank { harness.group.ranks[0] }
    var handle: HostHandle { harness.handles[0] }

    /// A poison-filled tensor that lives as long as the fixture.
    func scratch(_ dtype: DataType, _ shape: [Int]) throws -> TensorRef {
        let t = try HostTensor(dtype, shape)
        t.fill(byte: StepHarness.poison)
        scratchTensors.append(t)
        return t.ref
    }

    var goodDispatch: (DispatchInput, DispatchOutput) { (harness.dispatchInput(0), harness.dispatchOutput(0)) }

    func goodCombine(_ direction: PassDirection) -> (CombineInput, CombineOutput) {
        (harness.combineInput(0, direction), harness.combineOutput(0, direction))
    }
}

extension TensorRef {
    func with(shape: [Int]) -> TensorRef { var t = self; t.shape = shape; return t }
    func with(dtype: DataType) -> TensorRef { var t = self; t.dtype = dtype; return t }
    func with(strides: [Int]) -> TensorRef { var t = self; t.strides = strides; return t }
    func with(location: MemoryLocation) -> TensorRef { var t = self; t.location = location; return t }
    var withoutAddress: TensorRef { var t = self; t.address = nil; return t }
}
