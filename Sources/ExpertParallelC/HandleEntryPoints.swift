import CExpertParallel
import ExpertParallel

// The per-rank calls: what one rank calls (host group: from a thread of its own; NCCL-rank
// group: this process's rank).

@_cdecl("epHandleCreate")
public func cHandleCreate(_ group: epGroup_t?, _ rank: Int32, _ handle: UnsafeMutablePointer<epHandle_t?>?) -> epResult_t {
    entryPoint("epHandleCreate") {
        let result = try required(handle, "handle")
        let object = try groupRegistry.object(group, "group")
        let rank = try object.checkRank(rank)
        let calls = try object.withBackend { try $0.rankCalls(rank: rank) }
        result.pointee = handleRegistry.add(HandleObject(group: object, calls: calls))
    }
}

@_cdecl("epHandleDestroy")
public func cHandleDestroy(_ handle: epHandle_t?) -> epResult_t {
    entryPoint("epHandleDestroy") {
        try handleRegistry.remove(handle, "handle")
    }
}

@_cdecl("epHandleUpdate")
public func cHandleUpdate(
    _ handle: epHandle_t?, _ inputs: UnsafePointer<epUpdateInputs_t>?, _ config: UnsafePointer<epUpdateConfig_t>?,
    _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epHandleUpdate") {
        let object = try handleRegistry.object(handle, "handle")
        let settings = try CallSettings(config)
        let inputs = try epUpdateInputs_t.read(inputs, "inputs")
        try object.group.withRank(object.calls) { try $0.update(inputs, settings, stream) }
    }
}

@_cdecl("epDispatch")
public func cDispatch(
    _ handle: epHandle_t?, _ inputs: UnsafePointer<epDispatchInputs_t>?, _ outputs: UnsafePointer<epDispatchOutputs_t>?,
    _ config: UnsafePointer<epDispatchConfig_t>?, _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epDispatch") {
        let object = try handleRegistry.object(handle, "handle")
        let settings = try CallSettings(config)
        let inputs = try epDispatchInputs_t.read(inputs, "inputs")
        let outputs = try epDispatchOutputs_t.read(outputs, "outputs")
        try object.group.withRank(object.calls) { try $0.dispatch(inputs, outputs, settings, stream) }
    }
}

@_cdecl("epCombine")
public func cCombine(
    _ handle: epHandle_t?, _ inputs: UnsafePointer<epCombineInputs_t>?, _ outputs: UnsafePointer<epCombineOutputs_t>?,
    _ config: UnsafePointer<epCombineConfig_t>?, _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epCombine") {
        let object = try handleRegistry.object(handle, "handle")
        let settings = try CallSettings(config)
        let inputs = try epCombineInputs_t.read(inputs, "inputs")
        let outputs = try epCombineOutputs_t.read(outputs, "outputs")
        try object.group.withRank(object.calls) { try $0.combine(inputs, outputs, settings, stream) }
    }
}
