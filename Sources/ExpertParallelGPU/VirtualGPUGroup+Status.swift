import ExpertParallel
import ExpertParallelCUDA

extension VirtualGPUGroup {
    /// Waits for all work on the device, on every stream the calls were given. Control path.
    public func synchronize() throws(EPError) {
        try device.makeCurrent()
        try gpu { try device.driver.synchronizeContext() }
    }

    /// Synchronises, then throws the first error any rank recorded on the device in the last
    /// step (invalid routing, a timeout, a peer's invalid routing).
    public func checkStatus() throws(EPError) {
        try synchronize()
        var first: EPError?
        for r in 0..<config.ranks {
            let words = try gpu {
                try device.driver.read(UInt32.self, from: workspaces[r].advanced(by: StepWorkspace.status * 4), count: 4)
            }
            guard let error = DeviceStatus.error(words, rank: r, config: config) else { continue }
            // The rank whose routing was invalid reports the cause; report that one first.
            if case .peerFailed = error {
                if first == nil { first = error }
                continue
            }
            throw error
        }
        if let first { throw first }
    }

    /// What `rank` received in the last step (synchronises). This is the one call that brings
    /// the received counts, and the received total, to the host.
    public func layoutInfo(rank: Int) throws(EPError) -> LayoutInfo {
        try synchronize()
        let words = try gpu {
            try device.driver.read(UInt32.self, from: workspaces[rank].advanced(by: workspace.layout * 4), count: workspace.layoutWords)
        }.map { Int($0) }
        return workspace.layoutInfo(words, config: config)
    }

    /// The group's active-rank mask (synchronises).
    public var activeRanks: RankMask {
        get throws(EPError) {
            try synchronize()
            return RankMask(bits: try gpu { try device.driver.read(UInt64.self, from: mask, count: 1)[0] })
        }
    }

    /// Masks `rank` inactive: it sends and receives nothing until cleaned. Control path.
    public func deactivate(rank: Int) throws(EPError) {
        var bits = try activeRanks
        bits.remove(rank)
        try gpu { try device.driver.copy([bits.bits], to: mask) }
    }

    /// Marks `ranks` active again and resets every rank's flags and sequence numbers, so ranks
    /// that fell out of step start afresh. Control path: call between steps.
    public func clean(ranks: RankMask) throws(EPError) {
        var bits = try activeRanks
        bits.bits |= ranks.bits & RankMask.all(config.ranks).bits
        try gpu {
            for p in workspaces { try device.driver.fill(p, byte: 0, byteCount: workspace.bytes) }
            try device.driver.copy([bits.bits], to: mask)
        }
    }
}
