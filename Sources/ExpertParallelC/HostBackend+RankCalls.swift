import Foundation
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

    /// The last send-only call ("dispatch" or "combine"; it ran whole), until complete() closes it.
    private let pending = NSLock()
    private var openSendOnly: String?

    private func noteSendOnly(_ settings: CallSettings, _ call: String) {
        if settings.phase == .sendOnly { pending.withLock { openSendOnly = call } }
    }

    /// Refuses a data call while a send-only call waits for complete(), as every backend does (a
    /// GPU's receiving half is still to be enqueued), after the descriptors are read and before
    /// the shapes are checked, as there. Part of a call's checks: a refused call still takes its
    /// place among the ranks, and the send-only call stays open.
    private func requireNothingOpen() throws(EPError) {
        if let open = pending.withLock({ openSendOnly }) { throw .sendOnlyOpen(open) }
    }

    /// A host rank's calls run whole: completing closes the last send-only call, which must exist
    /// (as the collective epGroupComplete says).
    func complete(_ stream: UnsafeMutableRawPointer?) throws {
        let open = pending.withLock { () -> String? in
            defer { openSendOnly = nil }
            return openSendOnly
        }
        guard open != nil else { throw EPError.nothingToComplete }
    }

    /// A host rank's per-rank calls use their handle's own step.
    private func requireOwnStep(_ settings: CallSettings) throws(EPError) {
        guard settings.step == nil else {
            throw .invalidArgument(field: "config.step", value: "a step", requirement: "must be NULL: a host group's per-rank calls use their handle's own step (name steps in the collective calls)")
        }
    }

    func update(_ inputs: epUpdateInputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        try make(.update, { () throws in
            try requireOwnStep(settings)
            let topkIdx = try TensorDescriptor.tensor(inputs.topkIdx, "inputs.topkIdx")
            try requireNothingOpen()
            return topkIdx
        }) { topkIdx in
            try call { try rank.update(handle, topkIdx: topkIdx) }
        }
    }

    func dispatch(
        _ inputs: epDispatchInputs_t, _ outputs: epDispatchOutputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        try make(.dispatch, {
            try requireOwnStep(settings)
            let arguments = (try LayoutInfoDestination(outputs.layoutInfo, "outputs.layoutInfo"), try DispatchInput(inputs, "inputs"),
                             try DispatchOutput(outputs, "outputs"))
            try requireNothingOpen()
            return arguments
        }) { destination, input, output in
            try call {
                let info = try rank.dispatch(handle, input, into: output, direction: settings.direction)
                destination?.fill(info)
                noteSendOnly(settings, "dispatch")
            }
        }
    }

    func combine(
        _ inputs: epCombineInputs_t, _ outputs: epCombineOutputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?
    ) throws {
        try make(.combine, { () throws in
            try requireOwnStep(settings)
            let arguments = (try CombineInput(inputs, "inputs"), try CombineOutput(outputs, "outputs"))
            try requireNothingOpen()
            return arguments
        }) { input, output in
            try call {
                try rank.combine(handle, input, into: output, direction: settings.direction)
                noteSendOnly(settings, "combine")
            }
        }
    }

    /// The call's place among the ranks is taken all the same (`HostRank.refuse`); the caller
    /// sees the refusal's own error.
    func refuse(_ call: HostRank.RefusedCall, _ error: any Error) {
        let posted = (error as? EPError) ?? .invalidArgument(field: "call", value: "\(call)", requirement: "\(error)")
        _ = try? rank.refuse(call, handle, posted)
    }
}

extension HostBackend {
    func rankCalls(rank: Int) throws -> any RankCalls { try HostRankCalls(group[rank]) }
}
