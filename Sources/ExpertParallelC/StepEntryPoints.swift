import CExpertParallel
import ExpertParallel

// Steps (ABI v3): several steps live on one group, named in the calls' configs; the receiving
// half of a send-only call; an NCCL-rank group's own buffers for zero-copy calls.

/// What an `epStep_t` points at: one step's handle, and the group it keeps alive.
final class StepObject: @unchecked Sendable {
    let group: GroupObject
    let handle: any StepHandle
    /// Host group: each rank's tokens in the step's last accepted update (to name a failing rank).
    var stepTokens: [Int]?

    init(group: GroupObject, handle: any StepHandle) {
        self.group = group
        self.handle = handle
    }

    deinit { handle.release() }   // while the group that waits for its work is still here
}

let stepRegistry = Registry<StepObject>(kind: "epStep_t")

@_cdecl("epStepCreate")
public func cStepCreate(_ group: epGroup_t?, _ step: UnsafeMutablePointer<epStep_t?>?) -> epResult_t {
    entryPoint("epStepCreate") {
        let result = try required(step, "step")
        let object = try groupRegistry.object(group, "group")
        let handle = try object.withBackend { try $0.makeStep() }
        result.pointee = stepRegistry.add(StepObject(group: object, handle: handle))
    }
}

@_cdecl("epStepDestroy")
public func cStepDestroy(_ step: epStep_t?) -> epResult_t {
    entryPoint("epStepDestroy", clearing: false) {
        guard let step else { return }
        let object = try stepRegistry.object(step, "step")
        // Released under the group's lock, so that no call of the group is using it meanwhile.
        try object.group.withBackend { _ in
            try stepRegistry.remove(step, "step")
            object.handle.release()
        }
    }
}

@_cdecl("epStepGetLayoutInfo")
public func cStepGetLayoutInfo(_ step: epStep_t?, _ rank: Int32, _ info: UnsafeMutablePointer<epLayoutInfo_t>?) -> epResult_t {
    entryPoint("epStepGetLayoutInfo") {
        let object = try stepRegistry.object(step, "step")
        let rank = try object.group.checkRank(rank)
        let destination = try required(try LayoutInfoDestination(info, "info"), "info")
        destination.fill(try naming(object.group.statusNames) { try object.group.withBackend { try $0.layoutInfo(step: object.handle, rank: rank) } })
    }
}

@_cdecl("epGroupComplete")
public func cGroupComplete(_ group: epGroup_t?, _ stream: UnsafeMutableRawPointer?) -> epResult_t {
    entryPoint("epGroupComplete") {
        let object = try groupRegistry.object(group, "group")
        try object.withBackend { try $0.complete(stream) }
    }
}

@_cdecl("epComplete")
public func cComplete(_ handle: epHandle_t?, _ stream: UnsafeMutableRawPointer?) -> epResult_t {
    entryPoint("epComplete") {
        let object = try handleRegistry.object(handle, "handle")
        try object.group.withRank(object.calls) { try $0.complete(stream) }
    }
}

@_cdecl("epGroupGetBuffer")
public func cGroupGetBuffer(_ group: epGroup_t?, _ slot: Int32, _ buffer: epBuffer_t, _ tensor: UnsafeMutablePointer<epTensor_t>?) -> epResult_t {
    entryPoint("epGroupGetBuffer") {
        let object = try groupRegistry.object(group, "group")
        _ = try epTensor_t.read(tensor, "tensor")
        let found = try object.withBackend { try $0.buffer(slot: Int(slot), buffer) }
        let destination = try required(tensor, "tensor")
        write(TensorDescriptor.describe(found, location: object.location), to: UnsafeMutableRawPointer(destination))
    }
}

@_cdecl("epGroupCopyReceived")
public func cGroupCopyReceived(
    _ group: epGroup_t?, _ step: epStep_t?, _ tokens: UnsafePointer<epTensor_t>?, _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epGroupCopyReceived") {
        let object = try groupRegistry.object(group, "group")
        let named = try CallSettings.step(step, object, "step")
        let destination = try TensorDescriptor.tensor(tokens, "tokens")
        try object.withBackend { try $0.copyReceived(step: named?.handle, into: destination, stream) }
    }
}
