import CExpertParallel
import ExpertParallel

// The collective calls: one C call runs a step for all R ranks of a group.

@_cdecl("epGroupUpdateAll")
public func cGroupUpdateAll(
    _ group: epGroup_t?, _ inputs: UnsafePointer<epUpdateInputs_t>?, _ config: UnsafePointer<epUpdateConfig_t>?,
    _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epGroupUpdateAll", naming: .collective) {
        let object = try groupRegistry.object(group, "group")
        let settings = try CallSettings(config, group: object)
        let inputs = try epUpdateInputs_t.readArray(inputs, count: object.config.ranks, "inputs")
        try object.withBackend { try $0.updateAll(inputs, settings, stream) }
    }
}

@_cdecl("epGroupDispatchAll")
public func cGroupDispatchAll(
    _ group: epGroup_t?, _ inputs: UnsafePointer<epDispatchInputs_t>?, _ outputs: UnsafePointer<epDispatchOutputs_t>?,
    _ config: UnsafePointer<epDispatchConfig_t>?, _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epGroupDispatchAll", naming: .collective) {
        let object = try groupRegistry.object(group, "group")
        let settings = try CallSettings(config, group: object)
        let inputs = try epDispatchInputs_t.readArray(inputs, count: object.config.ranks, "inputs")
        let outputs = try epDispatchOutputs_t.readArray(outputs, count: object.config.ranks, "outputs")
        try object.withBackend { try $0.dispatchAll(inputs, outputs, settings, stream) }
    }
}

@_cdecl("epGroupCombineAll")
public func cGroupCombineAll(
    _ group: epGroup_t?, _ inputs: UnsafePointer<epCombineInputs_t>?, _ outputs: UnsafePointer<epCombineOutputs_t>?,
    _ config: UnsafePointer<epCombineConfig_t>?, _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epGroupCombineAll", naming: .collective) {
        let object = try groupRegistry.object(group, "group")
        let settings = try CallSettings(config, group: object)
        let inputs = try epCombineInputs_t.readArray(inputs, count: object.config.ranks, "inputs")
        let outputs = try epCombineOutputs_t.readArray(outputs, count: object.config.ranks, "outputs")
        try object.withBackend { try $0.combineAll(inputs, outputs, settings, stream) }
    }
}

@_cdecl("epGroupCheckStatus")
public func cGroupCheckStatus(_ group: epGroup_t?) -> epResult_t {
    entryPoint("epGroupCheckStatus") {
        let object = try groupRegistry.object(group, "group")
        try naming(object.statusNames) { try object.withBackend { try $0.checkStatus() } }
    }
}

@_cdecl("epGroupGetLayoutInfo")
public func cGroupGetLayoutInfo(_ group: epGroup_t?, _ rank: Int32, _ info: UnsafeMutablePointer<epLayoutInfo_t>?) -> epResult_t {
    entryPoint("epGroupGetLayoutInfo") {
        let object = try groupRegistry.object(group, "group")
        let rank = try object.checkRank(rank)
        let destination = try required(try LayoutInfoDestination(info, "info"), "info")
        destination.fill(try naming(object.statusNames) { try object.withBackend { try $0.layoutInfo(rank: rank) } })
    }
}
