import ExpertParallel
@testable import ExpertParallelC
import Testing

/// The C entry points name the arguments as their parameters and structs do: the library's checks
/// name the Swift calls' fields (`input.tokens.shape`, a stacked call's `inputs.address`), and each
/// entry point renames them (`CNames`) before the message is set.
struct CFieldNamesTests {
    static func named(_ field: String, _ names: CNames) -> String {
        guard case let .invalidArgument(renamed, _, _) = EPError.invalidArgument(field: field, value: "v", requirement: "r").naming(names) as? EPError
        else { return "(not an EPError)" }
        return renamed
    }

    @Test(arguments: [
        // The per-rank calls: their parameters are inputs and outputs, the descriptor's fields data, device, sizes.
        ("input.tokens.shape", "inputs.tokens.sizes"), ("output.topkIdx.location", "outputs.topkIdx.device"),
        ("input.topkWeights", "inputs.topkWeights"), ("input.tokens.address", "inputs.tokens.data"),
        ("inputs[1].tokens.address", "inputs[1].tokens.data"), ("outputs[0].tokens.strides", "outputs[0].tokens.strides"),
        ("inputs", "inputs"), ("rank", "rank"), ("inputsX.tokens", "inputsX.tokens"), ("config.direction", "config.direction"),
    ])
    func perRankCallsNameInputsAndOutputs(_ field: String, _ expected: String) {
        #expect(Self.named(field, .perRank) == expected)
    }

    @Test(arguments: [
        ("topkIdx.shape[0] (tokens)", "inputs.topkIdx.sizes[0] (tokens)"), ("topkIdx[rank 1].location", "inputs.topkIdx[rank 1].device"),
        ("topkIdx[0][1]", "inputs.topkIdx[0][1]"), ("topkIdx", "inputs.topkIdx"), ("handle", "handle"),
    ])
    func updatesNameTheirInputs(_ field: String, _ expected: String) {
        #expect(Self.named(field, .update) == expected)
    }

    @Test(arguments: [
        ("inputs.rankStride", "call.inputTokens.rankStride"), ("received.address", "call.receivedTokens.data"),
        ("receivedTopkIdx.location", "call.receivedTopkIdx.device"), ("tokens", "call.tokens"),
        ("topkIdx[rank 2][3][1]", "call.topkIdx[rank 2][3][1]"), ("call.receivedTokens.device", "call.receivedTokens.device"),
        ("expertSourceCounts.dtype", "call.expertSourceCounts.dtype"), ("rank", "rank"),
    ])
    func stackedDispatchesNameTheCallsFields(_ field: String, _ expected: String) {
        #expect(Self.named(field, CheckedStackedDispatch.Field.cNames) == expected)
    }

    @Test func stackedCombinesNameTheCallsFields() {
        #expect(Self.named("combined.address", CheckedStackedCombine.Field.cNames) == "call.combinedTokens.data")
        #expect(Self.named("topkWeights.dtype", CheckedStackedCombine.Field.cNames) == "call.topkWeights.dtype")
    }

    /// A peer's reason (its error's text) and a collective call's rank failure are renamed too;
    /// what is not an argument's error stays as it is.
    @Test func reasonsAndRankFailuresAreRenamed() {
        let peer = EPError.peerFailed(rank: 0, peer: 1, reason: "invalid argument: input.tokens.shape = [3, 9]; must be [3, 8]")
        #expect(peer.naming(.perRank).message == "rank 0 did nothing because rank 1 rejected its call: invalid argument: inputs.tokens.sizes = [3, 9]; must be [3, 8]")
        let other = EPError.peerFailed(rank: 0, peer: 1, reason: "its topkIdx was invalid")
        #expect(other.naming(.perRank).message == other.message)
        let failure = RankFailure(rank: 2, error: .invalidArgument(field: "output.tokens.shape", value: "[1]", requirement: "must be [2]"),
                                  config: GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 8, topK: 2, hidden: 8, maxTokensPerRank: 2))
        #expect(failure.naming(.perRank).message == "rank 2: invalid argument: outputs.tokens.sizes = [1]; must be [2]")
        #expect(EPError.overflow(rank: 1, required: 5, capacity: 4).naming(.perRank).message == EPError.overflow(rank: 1, required: 5, capacity: 4).message)
    }
}
