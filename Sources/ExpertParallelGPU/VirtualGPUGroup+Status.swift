import ExpertParallel
import ExpertParallelCUDA

extension VirtualGPUGroup {
    /// Waits for the group's work: its own stream, its rank streams and the caller streams given to
    /// calls since the last wait (not the whole device, so another thread's graph capture goes on).
    public func synchronize() throws(EPError) { try engine.synchronize() }

    /// Synchronises, then throws the first error any rank recorded on the device since the last
    /// check (invalid routing, a timeout, a peer's invalid routing), and clears them.
    public func checkStatus() throws(EPError) { try engine.checkStatus() }

    /// What `rank` received in `handle`'s step (synchronises). This is the one call that brings
    /// the received counts, and the received total, to the host.
    public func layoutInfo(_ handle: GPUStepHandle, rank: Int) throws(EPError) -> LayoutInfo {
        try engine.layoutInfo(handle, rank: rank)
    }

    /// What `rank` received in the default handle's last step (synchronises).
    public func layoutInfo(rank: Int) throws(EPError) -> LayoutInfo { try engine.layoutInfo(implicitHandle, rank: rank) }

    /// The group's active-rank mask (synchronises).
    public var activeRanks: RankMask { get throws(EPError) { try engine.activeRanks } }

    /// Masks `rank` inactive: it sends and receives nothing until cleaned. Control path.
    public func deactivate(rank: Int) throws(EPError) { try engine.deactivate(rank: rank) }

    /// Marks `ranks` active again and resets every rank's flags and sequence numbers, so ranks
    /// that fell out of step start afresh. Control path: call between steps.
    public func clean(ranks: RankMask) throws(EPError) { try engine.clean(ranks: ranks) }
}
