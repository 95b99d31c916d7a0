import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// The overlap checks refuse no legitimate flow of an NCCL rank's calls with the caller's own
/// tensors (the C ABI's and the Python package's epGroupDispatch / epGroupCombine): received
/// rows, ids, weights and scales copied out of the slot's buffers, a combine of the caller's
/// expert outputs copied in (HT expert-major with the caller's per-slot weights, or the slot's;
/// HT backward with the caller's weight gradients), the stacked combine of a caller's tensor,
/// and the backward passes; in every layout (over the mock driver).
@Suite(.serialized)
struct CallerTensorFlowsMockTests {
    @Test(arguments: NCCLStackedCallMockTests.cases.indices)
    func callerTensorFlowsAreNotRefused(_ index: Int) throws {
        let (name, config) = NCCLStackedCallMockTests.cases[index]
        let b = config.maxTokensPerRank - 1
        let ht = config.algorithm == .highThroughput
        try NCCLStackedCallMockTests.step(config, tokens: b) { _, _, group, a, handle in
            let r = group.rank
            do {
                // A per-rank step into the caller's tensors (copied out of slot 0), its combine
                // from the caller's expert outputs (copied in), and its backward pass.
                try group.update(handle, topkIdx: [a.part("idx", r)!])
                try group.dispatch(a.dispatchInput(r), copyingInto: a.dispatchOutput(r), handle: handle)
                let weights: TensorRef? = config.layout == .expertMajor ? a.part("w", r) : config.isExpertMajorHT ? a.part("recvW", r) : nil
                try group.combine(copyingFrom: CombineInput(expertOutputs: a.part("y", r)!, topkWeights: weights),
                                  into: CombineOutput(tokens: a.part("out", r)!), handle: handle)
                try group.dispatch(a.dispatchInput(r), copyingInto: a.dispatchOutput(r), handle: handle)
                if ht {
                    try group.combine(copyingFrom: CombineInput(expertOutputs: a.part("y", r)!, weightGradients: a.part("gradIn", r)),
                                      into: CombineOutput(tokens: a.part("out", r)!, topkWeightGradients: a.part("gradOut", r)),
                                      handle: handle, direction: .backward)
                }
                // Stacked: into slot 1's own buffers, then a combine of the caller's expert outputs
                // (HT expert-major: the slot's per-slot weights; backward: its weight gradients).
                let slot = 1, buffers = group.slots[slot]
                try group.dispatch(handle, stacked: NCCLStackedCallMockTests.dispatch(a, group, slot: slot, tokens: b, routing: true))
                let stackedWeights: StackedTensor? = config.layout == .expertMajor ? NCCLStackedCallMockTests.part(a, "w", r)
                    : config.isExpertMajorHT ? NCCLStackedCallMockTests.stacked(buffers.receivedWeights) : nil
                try group.combine(handle, stacked: StackedCombine(expertOutputs: NCCLStackedCallMockTests.part(a, "y", r)!, topkWeights: stackedWeights,
                                                                  combined: NCCLStackedCallMockTests.part(a, "out", r)!))
                try group.dispatch(handle, stacked: NCCLStackedCallMockTests.dispatch(a, group, slot: slot, tokens: b, routing: false), direction: .backward)
                if ht {
                    try group.combine(handle, stacked: StackedCombine(expertOutputs: NCCLStackedCallMockTests.part(a, "y", r)!,
                                                                      weightGradients: NCCLStackedCallMockTests.stacked(buffers.weightGradients),
                                                                      combined: NCCLStackedCallMockTests.part(a, "out", r)!,
                                                                      topkWeightGradients: NCCLStackedCallMockTests.part(a, "gradOut", r)),
                                      direction: .backward)
                    // The slot's own expert outputs and the caller's weight gradients (copied in).
                    try group.dispatch(handle, stacked: NCCLStackedCallMockTests.dispatch(a, group, slot: slot, tokens: b, routing: false), direction: .backward)
                    try group.combine(copyingFrom: CombineInput(expertOutputs: buffers.expertOutputs, weightGradients: a.part("gradIn", r)),
                                      into: CombineOutput(tokens: a.part("out", r)!, topkWeightGradients: a.part("gradOut", r)),
                                      handle: handle, direction: .backward)
                }
            } catch {
                Issue.record("\(name), rank \(r): \(error)")
            }
        }
    }

    /// `copyReceived` (epGroupCopyReceived) copies out of the slot its step's dispatch used, with
    /// one launch; a step not dispatched yet, one whose slot a later dispatch took, a tensor of
    /// another shape and one not 8-byte aligned (also as a dispatch's output) are refused by
    /// name, launching nothing.
    @Test(arguments: NCCLStackedCallMockTests.cases.indices.prefix(3))
    func copyingTheReceivedRowsOutChecksTheStepAndTheTensor(_ index: Int) throws {
        let (name, config) = NCCLStackedCallMockTests.cases[index]
        try NCCLStackedCallMockTests.step(config, tokens: config.maxTokensPerRank - 1) { mock, _, group, a, handle in
            let r = group.rank, tokens = a.dispatchOutput(r).tokens
            func refused(_ call: () throws(EPError) -> Void, _ words: String) {
                let launches = mock.launches
                do {
                    try call()
                    Issue.record("\(name): not refused (\(words))")
                } catch {
                    #expect("\(error)".contains(words), "\(name): \(error)")
                }
                #expect(mock.launches == launches, "\(name): a refused copy launches nothing")
            }
            do {
                try group.update(handle, topkIdx: [a.part("idx", r)!])
                refused({ () throws(EPError) in try group.copyReceived(handle, into: tokens) }, "copyReceived needs a dispatch of this handle's step first")
                try group.dispatch(handle, [a.dispatchInput(r)], slot: 0)
                var shrunk = tokens
                shrunk.shape[shrunk.shape.count - 1] -= 1
                refused({ () throws(EPError) in try group.copyReceived(handle, into: shrunk) }, "tokens.shape")
                // A view at an odd element: the copy's 8-byte vectors would fault on the device.
                var odd = tokens
                odd.address = tokens.address?.advanced(by: config.elementType.byteSize)
                refused({ () throws(EPError) in try group.copyReceived(handle, into: odd) }, "tokens.address")
                // A dispatch into such a view of the caller's: refused too (its rows would have to be
                // copied whole, with what earlier steps left in the slot outside the zones).
                var oddOutput = a.dispatchOutput(r)
                oddOutput.tokens = odd
                refused({ () throws(EPError) in try group.dispatch(a.dispatchInput(r), copyingInto: oddOutput, handle: handle) }, "output.tokens.address")
                let launches = mock.launches
                try group.copyReceived(handle, into: tokens)
                #expect(mock.launches == launches + 1, "\(name): one launch")
                let later = try group.makeHandle()
                defer { later.release() }
                try group.update(later, topkIdx: [a.part("idx", r)!])
                try group.dispatch(later, [a.dispatchInput(r)], slot: 0)
                refused({ () throws(EPError) in try group.copyReceived(handle, into: tokens) }, "holds a later dispatch's rows now: copyReceived a step before its slot is used again")
            } catch {
                Issue.record("\(name), rank \(r): \(error)")
            }
        }
    }

    /// An FP8 group's copy is refused as such (field `group`), before its tensor's checks, with
    /// the e4m3 receive buffer's own type as well as with an element type, launching nothing.
    @Test func anFP8GroupsCopyIsRefusedByNameLaunchingNothing() throws {
        let (name, config) = try #require(NCCLStackedCallMockTests.cases.first { $0.1.fp8 != nil && $0.1.ranks == 1 })
        try NCCLStackedCallMockTests.step(config, tokens: config.maxTokensPerRank - 1) { mock, device, group, a, handle in
            do {
                try group.update(handle, topkIdx: [a.part("idx", group.rank)!])
                try group.dispatch(handle, [a.dispatchInput(group.rank)], slot: 0)
                let elements = try DeviceTensor(config.elementType, config.receiveShape, on: device)
                for tokens in [group.slots[0].receivedTokens, elements.ref] {
                    let launches = mock.launches
                    do {
                        try group.copyReceived(handle, into: tokens)
                        Issue.record("\(name): an FP8 group's copy is not refused (\(tokens.dtype))")
                    } catch {
                        var named = false
                        if case .invalidArgument(let field, _, _)? = error as? EPError { named = field == "group" }
                        #expect(named && "\(error)".contains("FP8"), "\(name), \(tokens.dtype): \(error)")
                    }
                    #expect(mock.launches == launches, "\(name): a refused copy launches nothing")
                }
            } catch {
                Issue.record("\(name): \(error)")
            }
        }
    }
}
