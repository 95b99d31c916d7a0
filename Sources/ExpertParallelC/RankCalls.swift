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
    /// Enqueues the second half of the rank's last send-only call.
    func complete(_ stream: UnsafeMutableRawPointer?) throws
    /// The call could not be made: its arguments were refused (`error`) before it reached the rank.
    /// Ranks that meet their peers in every call (the host group's) still take the call's place,
    /// so the others fail at once and the ranks stay in step.
    func refuse(_ call: HostRank.RefusedCall, _ error: any Error)
}

extension RankCalls {
    /// Decodes a call's arguments and makes it; if decoding fails, the call is refused (the
    /// peers are told) and the decoding error is what the caller sees.
    func make<Arguments>(_ call: HostRank.RefusedCall, _ decode: () throws -> Arguments, _ body: (Arguments) throws -> Void) throws {
        let arguments: Arguments
        do { arguments = try decode() } catch {
            refuse(call, error)
            throw error
        }
        try body(arguments)
    }
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
