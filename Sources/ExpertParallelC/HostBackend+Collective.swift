import CExpertParallel
import ExpertParallel

/// The host group under the generic group calls (StepGroupCalls.swift). What differs: masked
/// ranks do nothing, so a call reads only the active ranks' arguments; a failed call names its
/// rank, "rank r: ..."; layout info is that of the last dispatch, also after a later update.
extension HostBackend: StepGroupBackend {
    var kind: epBackend_t { epBackendHost }

    func stepHandle() -> HostGroupHandle { handle }

    var location: MemoryLocation { .host }

    var multiprocessors: Int { 0 }

    /// The ranks that take part in a call: the active ones.
    func callRanks() throws -> [Int] { try group.activeRanks.ranks.filter { $0 < group.config.ranks } }

    func perform(_ call: StepCall, step: StepObject?, ranks: [Int], _ body: () throws(EPError) -> Void) throws {
        do {
            try body()
            switch call {
            case .update(let routing): setTokens(step, routing.map { $0.shape.first ?? 0 })
            case .dispatch:
                // (A masked rank's is all zeros, as the GPU group reports it.)
                if step == nil { lastLayout = group.localRanks.map { r in try? group.layoutInfo(handle, rank: r) } }
            case .combine: break
            }
        } catch {
            // An update refused before it began (a send-only call still open) leaves the step as
            // it was; one that began voided it (the handle then has no current step).
            if case .update = call, !stepSurvived(step) { setTokens(step, nil) }
            guard let rank = failingRank(error, call, ranks, tokens: step.map { $0.stepTokens } ?? stepTokens) else { throw error }
            throw RankFailure(rank: rank, error: error, config: group.config)
        }
    }

    func stepTokens(_ settings: CallSettings) throws -> [Int] {
        guard let tokens = settings.step != nil ? settings.step?.stepTokens : stepTokens else {
            throw EPError.wrongOrder("combine needs an update and a dispatch of this step first")
        }
        return tokens
    }

    /// Whether the step of `step` (nil: the group's own) is still the last accepted update's.
    private func stepSurvived(_ step: StepObject?) -> Bool {
        ((step?.handle as? HostGroupHandle) ?? handle).currentStep != nil
    }

    /// Each rank's tokens in the step's last accepted update (the step's own, or the group's).
    private func setTokens(_ step: StepObject?, _ tokens: [Int]?) {
        if let step { step.stepTokens = tokens } else { stepTokens = tokens }
    }

    /// What `rank` received in the last collective dispatch of the group's own step (the handle
    /// forgets it at an update; a named step's is `layoutInfo(step:rank:)`).
    func layoutInfo(rank: Int) throws -> LayoutInfo {
        guard let info = lastLayout[rank] else {
            throw EPError.wrongOrder(
                "rank \(rank) has no layout info: no dispatch of the group's own step (a config.step of NULL) has completed yet; a named step's is epStepGetLayoutInfo's")
        }
        return info
    }

    /// The rank whose own error `error` is; nil for the group's own refusals. The core throws the
    /// error of the lowest rank that failed for a reason of its own (the others only saw a peer
    /// fail), but not that rank: an error that names its rank gives it; one that every rank meets
    /// alike (an overflow of the exchanged counts, a handle with no step) is the lowest rank's; for
    /// the rest, each rank's checks of its own arguments run again, in rank order.
    private func failingRank(_ error: EPError, _ call: StepCall, _ ranks: [Int], tokens stepTokens: [Int]?) -> Int? {
        switch error {
        case .peerFailed(let rank, _, _), .timeout(let rank, _), .inactiveRank(let rank):
            return rank
        case .overflow:
            return ranks.first   // every rank finds it in the same exchanged counts
        case _ where CallShapes.isAcrossRanks(error):
            return nil   // one rank's output over another's argument: the group's refusal, naming both
        case .wrongOrder:
            // Before a successful update every rank's handle refuses a dispatch or combine alike;
            // otherwise only the group refuses (the active ranks changed since the update).
            if case .update = call { return nil }
            return stepTokens == nil ? ranks.first : nil
        default:
            return ranks.first { rejects(call, rank: $0, with: error, tokens: stepTokens) } ?? ranks.first
        }
    }

    /// Whether rank `r`'s own checks of `call` throw `expected`.
    private func rejects(_ call: StepCall, rank r: Int, with expected: EPError, tokens stepTokens: [Int]?) -> Bool {
        let config = group.config, shapes = group.shapes, tokens = stepTokens?[r] ?? 0
        do throws(EPError) {
            switch call {
            case .update(let routing): _ = try RoutingTable(topkIdx: routing[r], checked: config)
            case let .dispatch(ins, outs): try shapes.validateDispatch(ins[r], outs[r], tokens: tokens)
            case let .combine(ins, outs, direction): try shapes.validateCombine(ins[r], outs[r], tokens: tokens, direction: direction)
            }
            return false
        } catch {
            return error == expected
        }
    }
}
