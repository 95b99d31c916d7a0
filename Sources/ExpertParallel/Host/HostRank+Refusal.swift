extension HostRank {
    /// A call of this rank whose arguments were refused before it could be made (a C caller's
    /// malformed struct or descriptor, say).
    package enum RefusedCall: Sendable { case update, dispatch, combine }

    /// Takes the refused call's place among the ranks all the same: posts `error` in the round the
    /// call would have used, so the other ranks' matching calls fail at once (`peerFailed`) and
    /// every rank's rounds stay in step (a refusal that skipped its round would pair this rank's
    /// next call with the others' previous one). An update's refusal voids the handle, as a failed
    /// update does. Throws the error the call would have thrown.
    package func refuse(_ call: RefusedCall, _ handle: HostHandle, _ error: EPError) throws(EPError) -> Never {
        try exclusive { () throws(EPError) -> Never in try refuseNow(call, handle, error) }
    }

    private func refuseNow(_ call: RefusedCall, _ handle: HostHandle, _ error: EPError) throws(EPError) -> Never {
        switch call {
        case .update:
            let thrown: EPError
            let (participants, epoch) = group.transport.snapshot
            if participants.contains(rank) {
                // Posting a failure returns at once, throwing that failure.
                _ = try? exchange(Result<RoutingSummary, EPError>.failure(error), participants)
                thrown = error
            } else {
                thrown = group.transport.refusal(of: rank, round: group.counters[rank].next(epoch: epoch))
            }
            if handle.rank == rank { handle.fail(thrown) }   // another rank's handle is not this call's to void
            throw thrown
        case .dispatch:
            try refuseStep(handle, combine: false, error, as: DispatchOutput.self)
        case .combine:
            try refuseStep(handle, combine: true, error, as: CombineInput.self)
        }
    }

    /// A dispatch's or combine's refusal: the step's own error if it has one (as the call would
    /// report), else `error`, posted with the payload type the other ranks' calls post.
    private func refuseStep<Payload: Sendable>(
        _ handle: HostHandle, combine: Bool, _ error: EPError, as _: Payload.Type
    ) throws(EPError) -> Never {
        let step = Result { () throws(EPError) in try self.step(handle, combine: combine) }
        let participants = (try? step.get())?.participants ?? group.transport.activeRanks
        let posted: EPError = if case .failure(let stepError) = step { stepError } else { error }
        _ = try exchange(Result<Payload, EPError>.failure(posted), participants)
        throw posted
    }
}
