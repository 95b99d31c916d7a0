import CExpertParallel
import ExpertParallel

/// One rank of a host group with a handle of its own: each call blocks until every active rank
/// has made its matching call (from its own thread).
final class HostRankCalls: RankCalls, @unchecked Sendable {
    let rank: HostRank
    let handle: HostHandle

    init(_ rank: HostRank) throws(EPError) {
        self.rank = rank
        handle = try rank.makeHandle()
    }

    var waitsForPeers: Bool { true }

    /// Runs one of the rank's calls; a timeout is reported with the group's timeout and as this
    /// rank's failure.
    private func call(_ body: () throws -> Void) throws {
        do {
            try body()
        } catch let error as EPError {
            if case .timeout = error { throw RankFailure(rank: rank.rank, error: error, config: rank.config) }
            throw error
        }
    }

    func update(_ inputs: epUpdateInputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        try call { try rank.update(handle, topkIdx: try TensorDescriptor.tensor(inputs.topkIdx, "inputs.topkIdx")) }
    }

    func dispatch(
        _ inputs: epDispatchInputs_t, _ outputs: epDispatchOutputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        let destination = try LayoutInfoDestination(outputs.layoutInfo, "outputs.layoutInfo")
        try call {
            let info = try rank.dispatch(
                handle, try DispatchInput(inputs, "inputs"), into: try DispatchOutput(outputs, "outputs"), direction: settings.direction)
            destination?.fill(info)
        }
    }

    func combine(
        _ inputs: epCombineInputs_t, _ outputs: epCombineOutputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        try call {
            try rank.combine(
                handle, try CombineInput(inputs, "inputs"), into: try CombineOutput(outputs, "outputs"), direction: settings.direction)
        }
    }
}

extension HostBackend {
    func rankCalls(rank: Int) throws -> any RankCalls { try HostRankCalls(group[rank]) }
}
