import CExpertParallel
import ExpertParallel

/// What a handle's calls do for its rank: one rank's update, dispatch and combine, from the C
/// structs. The host group's ranks meet on threads of this process; an NCCL rank meets its peers
/// in other processes, through the GPU.
protocol RankCalls: AnyObject {
    /// True when a call blocks until the other ranks of this process make theirs.
    var waitsForPeers: Bool { get }
    func update(_ inputs: epUpdateInputs_t, _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws
    func dispatch(
        _ inputs: epDispatchInputs_t, _ outputs: epDispatchOutputs_t, _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?) throws
    func combine(
        _ inputs: epCombineInputs_t, _ outputs: epCombineOutputs_t, _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?) throws
}

/// What an `epHandle_t` points at: one rank's calls, and the group it keeps alive.
final class HandleObject: @unchecked Sendable {
    let group: GroupObject
    let calls: any RankCalls

    init(group: GroupObject, calls: any RankCalls) {
        self.group = group
        self.calls = calls
    }
}
