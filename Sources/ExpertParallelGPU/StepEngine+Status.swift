import ExpertParallel
import ExpertParallelCUDA

extension StepEngine {
    /// Synchronises, then throws the first error a local rank recorded on the device since the
    /// last check (invalid routing, a timeout, a peer's invalid routing), and clears them all.
    /// A rank whose own routing was invalid is reported before the peers that refused for it.
    func checkStatus() throws(EPError) {
        try relaxed { () throws(EPError) in try checkStatusNow() }
    }

    private func checkStatusNow() throws(EPError) {
        try synchronize()
        var first: EPError?, cause: EPError?
        for r in localRanks {
            let status = workspaces[r].advanced(by: StepWorkspace.status * 4)
            let words = try gpu { try device.driver.read(UInt32.self, from: status, count: 4) }
            guard let error = DeviceStatus.error(words, rank: r, config: config) else { continue }
            try gpu { try device.driver.copy([UInt32](repeating: 0, count: 4), to: status) }
            if case .peerFailed = error {
                if first == nil { first = error }
            } else if cause == nil {
                cause = error
            }
        }
        if let error = cause ?? first { throw error }
    }

    /// What local rank `rank` received in `handle`'s step (synchronises): the one call that
    /// brings the received counts, and the received total, to the host.
    /// A rank masked inactive received nothing: all zeros, as the oracle says. An active rank
    /// whose step was void on the device (invalid routing, a peer's, a timeout, an overflow) has no
    /// layout: that is an error, whether or not `checkStatus()` has reported the cause yet.
    func layoutInfo(_ handle: GPUStepHandle, rank: Int) throws(EPError) -> LayoutInfo {
        try relaxed { () throws(EPError) -> LayoutInfo in try layoutInfoNow(handle, rank: rank) }
    }

    private func layoutInfoNow(_ handle: GPUStepHandle, rank: Int) throws(EPError) -> LayoutInfo {
        _ = try handle.currentStep()
        let base = try handle.words(rank: rank)
        try synchronize()
        let driver = device.driver
        let stepOK = try gpu { try driver.read(UInt32.self, from: base.advanced(by: StepWorkspace.stepOK * 4), count: 1)[0] }
        if stepOK == 0 {
            let active = RankMask(bits: try gpu { try driver.read(UInt64.self, from: mask, count: 1)[0] })
            guard active.contains(rank) else { return .empty(checked: config) }
            throw .wrongOrder("rank \(rank)'s step was void on the device (invalid routing, a peer's, a timeout or an overflow; checkStatus() names it): it has no layout")
        }
        let words = try gpu {
            try driver.read(UInt32.self, from: base.advanced(by: workspace.layout * 4), count: workspace.layoutWords)
        }.map { Int($0) }
        return workspace.layoutInfo(words, config: config)
    }

    /// The group's active-rank mask as this process sees it (synchronises).
    var activeRanks: RankMask {
        get throws(EPError) {
            try relaxed { () throws(EPError) -> RankMask in
                try synchronize()
                return RankMask(bits: try gpu { try device.driver.read(UInt64.self, from: mask, count: 1)[0] })
            }
        }
    }

    /// Masks `rank` inactive: it sends and receives nothing until cleaned. Control path.
    func deactivate(rank: Int) throws(EPError) {
        try checkNothingPending()   // (the receiving half of a send-only call would meet another mask)
        try relaxed { () throws(EPError) in try deactivateNow(rank: rank) }
    }

    private func deactivateNow(rank: Int) throws(EPError) {
        guard rank >= 0, rank < config.ranks else {
            throw .invalidArgument(field: "rank", value: "\(rank)", requirement: "must be in 0..<\(config.ranks)")
        }
        var bits = try activeRanks
        bits.remove(rank)
        try gpu { try device.driver.copy([bits.bits], to: mask) }
        try device.waitForLegacyStream()
    }

    /// Marks `ranks` active again and resets the local ranks' flags and sequence numbers, so
    /// ranks that fell out of step start afresh. Control path: call between steps; handles
    /// updated before must be updated again.
    func clean(ranks: RankMask) throws(EPError) {
        try checkNothingPending()   // (clean clears the flags a send-only call's receiving half waits on)
        try relaxed { () throws(EPError) in try cleanNow(ranks: ranks) }
    }

    private func cleanNow(ranks: RankMask) throws(EPError) {
        var bits = try activeRanks
        bits.bits |= ranks.bits & RankMask.all(config.ranks).bits
        try gpu {
            for r in localRanks { try device.driver.fill(workspaces[r], byte: 0, byteCount: workspace.bytes) }
            try device.driver.copy([bits.bits], to: mask)
        }
        try device.waitForLegacyStream()   // the next step's kernels run on streams that do not wait for it
    }
}

extension StepEngine {
    /// Runs a control-path `body` (synchronisations, synchronous copies) in relaxed stream
    /// capture mode: allowed while another thread captures a CUDA graph in global mode (PyTorch's
    /// default), which it then leaves intact.
    func relaxed<T>(_ body: () throws(EPError) -> T) throws(EPError) -> T {
        do {
            return try device.driver.withCaptureMode(.relaxed, body)
        } catch {
            throw gpuError(error)
        }
    }
}
