import CExpertParallel
import ExpertParallel

// The stacked calls (ABI v4): every per-rank argument one part of one array, described once.

extension epStackedDispatch_t: ABIStruct {}
extension epStackedCombine_t: ABIStruct {}

extension StackedTensor {
    /// The array `c` describes; nil when its data is NULL and the argument is optional. A
    /// required one with NULL data stays (address 0), so the call's checks name it.
    static func read(_ c: epStacked_t, _ name: @autoclosure () -> String, required: Bool = false) throws(EPError) -> StackedTensor? {
        guard c.data != nil || required else { return nil }
        let location = try MemoryLocation(device: c.device, "\(name()).device")
        return StackedTensor(address: UInt64(UInt(bitPattern: c.data)), dtype: try ABIEnum.dataType(c.dtype, "\(name()).dtype"),
                             location: location, rankStride: Int(c.rankStride))
    }
}

extension StackedDispatch {
    init(_ c: epStackedDispatch_t) throws(EPError) {
        func optional(_ t: epStacked_t, _ name: String) throws(EPError) -> StackedTensor? { try StackedTensor.read(t, "call.\(name)") }
        self.init(
            tokens: Int(c.tokens), topkIdx: try optional(c.topkIdx, "topkIdx"),
            inputs: try StackedTensor.read(c.inputTokens, "call.inputTokens", required: true)!,
            topkWeights: try optional(c.topkWeights, "topkWeights"), scales: try optional(c.scales, "scales"),
            received: try StackedTensor.read(c.receivedTokens, "call.receivedTokens", required: true)!,
            receivedTopkIdx: try optional(c.receivedTopkIdx, "receivedTopkIdx"),
            receivedTopkWeights: try optional(c.receivedTopkWeights, "receivedTopkWeights"),
            receivedScales: try optional(c.receivedScales, "receivedScales"), expertCounts: try optional(c.expertCounts, "expertCounts"),
            expertSourceCounts: try optional(c.expertSourceCounts, "expertSourceCounts"))
    }
}

extension StackedCombine {
    init(_ c: epStackedCombine_t) throws(EPError) {
        self.init(
            expertOutputs: try StackedTensor.read(c.expertOutputs, "call.expertOutputs", required: true)!,
            topkWeights: try StackedTensor.read(c.topkWeights, "call.topkWeights"),
            weightGradients: try StackedTensor.read(c.weightGradients, "call.weightGradients"),
            combined: try StackedTensor.read(c.combinedTokens, "call.combinedTokens", required: true)!,
            topkWeightGradients: try StackedTensor.read(c.topkWeightGradients, "call.topkWeightGradients"))
    }
}

extension CheckedStackedDispatch.Field {
    /// The epStackedDispatch_t field that carries this argument.
    var cName: String {
        switch self {
        case .inputs: "inputTokens"
        case .received: "receivedTokens"
        default: "\(self)"
        }
    }

    /// Each argument's Swift name beside its C field (`call.` and its name), `tokens` included.
    static let cNames = CNames(pairs: allCases.map { ("\($0)", "call.\($0.cName)") } + [("tokens", "call.tokens")])
}

extension CheckedStackedCombine.Field {
    /// The epStackedCombine_t field that carries this argument.
    var cName: String { self == .combined ? "combinedTokens" : "\(self)" }

    static let cNames = CNames(pairs: allCases.map { ("\($0)", "call.\($0.cName)") })
}

@_cdecl("epGroupDispatchStacked")
public func cGroupDispatchStacked(
    _ group: epGroup_t?, _ call: UnsafePointer<epStackedDispatch_t>?, _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epGroupDispatchStacked", naming: CheckedStackedDispatch.Field.cNames) {
        let object = try groupRegistry.object(group, "group")
        let c = try epStackedDispatch_t.read(call, "call")
        let settings = try CallSettings(direction: c.direction, mode: c.launchMode, phase: c.phase, step: c.step, group: object)
        let stacked = try StackedDispatch(c)
        try object.withBackend { try $0.dispatchStacked(stacked, settings, stream) }
    }
}

@_cdecl("epGroupCombineStacked")
public func cGroupCombineStacked(
    _ group: epGroup_t?, _ call: UnsafePointer<epStackedCombine_t>?, _ stream: UnsafeMutableRawPointer?
) -> epResult_t {
    entryPoint("epGroupCombineStacked", naming: CheckedStackedCombine.Field.cNames) {
        let object = try groupRegistry.object(group, "group")
        let c = try epStackedCombine_t.read(call, "call")
        let settings = try CallSettings(direction: c.direction, mode: c.launchMode, phase: c.phase, step: c.step, group: object)
        let stacked = try StackedCombine(c)
        try object.withBackend { try $0.combineStacked(stacked, settings, stream) }
    }
}
