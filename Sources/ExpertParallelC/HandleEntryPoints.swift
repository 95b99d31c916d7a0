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
    entryPoint("epHandleDestroy", clearing: false) {
        try handleRegistry.remove(handle, "handle")
    }
}

@_cdecl("epHandleUpdate")
public func cHandleUpdate(
    _ handle: epHandle_t?, _ inputs: UnsafePointer<epUpdateInputs_t>?, _ config: UnsafePointer<epUpdateConfig_t>?,
    _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epHandleUpdate", naming: .update) {
        let object = try handleRegistry.object(handle, "handle")
        try object.group.withRank(object.calls) { calls in
            try calls.make(.update, { (try CallSettings(config, group: object.group), try epUpdateInputs_t.read(inputs, "inputs")) }) { settings, inputs in
                try calls.update(inputs, settings, stream)
            }
        }
    }
}

@_cdecl("epDispatch")
public func cDispatch(
    _ handle: epHandle_t?, _ inputs: UnsafePointer<epDispatchInputs_t>?, _ outputs: UnsafePointer<epDispatchOutputs_t>?,
    _ config: UnsafePointer<epDispatchConfig_t>?, _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epDispatch", naming: .perRank) {
        let object = try handleRegistry.object(handle, "handle")
        try object.group.withRank(object.calls) { calls in
            try calls.make(.dispatch, {
                (try CallSettings(config, group: object.group), try epDispatchInputs_t.read(inputs, "inputs"), try epDispatchOutputs_t.read(outputs, "outputs"))
            }) { settings, inputs, outputs in
                try calls.dispatch(inputs, outputs, settings, stream)
            }
        }
    }
}

@_cdecl("epCombine")
public func cCombine(
    _ handle: epHandle_t?, _ inputs: UnsafePointer<epCombineInputs_t>?, _ outputs: UnsafePointer<epCombineOutputs_t>?,
    _ config: UnsafePointer<epCombineConfig_t>?, _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epCombine", naming: .perRank) {
        let object = try handleRegistry.object(handle, "handle")
        try object.group.withRank(object.calls) { calls in
            try calls.make(.combine, {
                (try CallSettings(config, group: object.group), try epCombineInputs_t.read(inputs, "inputs"), try epCombineOutputs_t.read(outputs, "outputs"))
            }) { settings, inputs, outputs in
                try calls.combine(inputs, outputs, settings, stream)
            }
        }
    }
}
