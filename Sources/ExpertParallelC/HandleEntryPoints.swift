import CExpertParallel
import ExpertParallel

// The per-rank calls (host group): what one rank calls, from a thread of its own.

@_cdecl("epHandleCreate")
public func cHandleCreate(_ group: epGroup_t?, _ rank: Int32, _ handle: UnsafeMutablePointer<epHandle_t?>?) -> epResult_t {
    entryPoint("epHandleCreate") {
        let result = try required(handle, "handle")
        let object = try groupRegistry.object(group, "group")
        let rank = try object.checkRank(rank)
        guard let host = object.host else {
            throw UnsupportedCall(message: "a virtual GPU group runs all its ranks in one launch and has no per-rank calls; use epGroupUpdateAll, epGroupDispatchAll and epGroupCombineAll")
        }
        let hostRank = host.group[rank]
        result.pointee = handleRegistry.add(HandleObject(group: object, rank: hostRank, handle: try hostRank.makeHandle()))
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
        _ = try CallSettings(config)
        let inputs = try epUpdateInputs_t.read(inputs, "inputs")
        try object.rank.update(object.handle, topkIdx: try TensorDescriptor.tensor(inputs.topkIdx, "inputs.topkIdx"))
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
        let destination = try LayoutInfoDestination(outputs.layoutInfo, "outputs.layoutInfo")
        let info = try object.rank.dispatch(
            object.handle, try DispatchInput(inputs, "inputs"), into: try DispatchOutput(outputs, "outputs"),
            direction: settings.direction)
        destination?.fill(info)
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
        try object.rank.combine(
            object.handle, try CombineInput(inputs, "inputs"), into: try CombineOutput(outputs, "outputs"),
            direction: settings.direction)
    }
}
