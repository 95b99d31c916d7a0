import Foundation

/// One step's handle on a `HostGroup` driven through `StepGroup`: a `HostHandle` for every rank
/// (its routing and plan) and what each rank received in the handle's last dispatch. Many can be
/// live at once; each holds only its own ranks' routing, so a handle's combine and backward
/// dispatch use its own routing whatever other handles were updated since.
public final class HostGroupHandle: StepHandle, @unchecked Sendable {   // mutable state under `lock`
    /// The group that made it: the only one its calls may go to.
    let group: HostGroup
    private let lock = NSLock()
    /// One per rank, in rank order; nil once released.
    private var handles: [HostHandle]?
    /// Per rank: the layout info of the last dispatch of this handle's current step (zeros for a
    /// rank that was masked in it), nil before any dispatch since the last update.
    private var layouts: [LayoutInfo?]
    /// The active ranks and transport epoch of the last successful update (nil before one).
    private var step: (ranks: RankMask, epoch: Int)?

    init(group: HostGroup, handles: [HostHandle]) {
        self.group = group
        self.handles = handles
        layouts = Array(repeating: nil, count: handles.count)
    }

    /// Drops the ranks' routing; later calls with this handle fail with `wrongOrder`.
    public func release() {
        lock.withLock {
            handles = nil
            layouts = []
            step = nil
        }
    }

    public var isReleased: Bool { lock.withLock { handles == nil } }

    /// The per-rank handles, or `wrongOrder` once released.
    func rankHandles() throws(EPError) -> [HostHandle] {
        guard let handles = lock.withLock({ handles }) else {
            throw .wrongOrder("this handle was released; make a new handle with makeHandle() and update it")
        }
        return handles
    }

    /// Who took part in the current step: set by a successful update, cleared when one starts.
    func recordStep(_ value: (ranks: RankMask, epoch: Int)?) { lock.withLock { step = value } }
    package var currentStep: (ranks: RankMask, epoch: Int)? { lock.withLock { step } }

    /// A new update (or a dispatch under way) makes the last dispatch's info stale.
    func forgetLayouts() {
        lock.withLock { layouts = Array(repeating: nil, count: layouts.count) }
    }

    /// Records a dispatch's results, `infos[i]` for rank `ranks[i]`; other ranks get none.
    func recordLayouts(_ infos: [LayoutInfo], ranks: [Int]) {
        lock.withLock {
            guard handles != nil else { return }   // released while the dispatch ran
            layouts = Array(repeating: nil, count: layouts.count)
            for (r, info) in zip(ranks, infos) { layouts[r] = info }
        }
    }

    func layout(rank: Int) throws(EPError) -> LayoutInfo {
        let (released, info) = lock.withLock { (handles == nil, layouts.indices.contains(rank) ? layouts[rank] : nil) }
        if released { throw .wrongOrder("this handle was released; its layout info went with it") }
        guard let info else {
            throw .wrongOrder("rank \(rank) has no layout info for this handle: no dispatch of its current step has completed")
        }
        return info
    }
}
