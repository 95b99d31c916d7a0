import CExpertParallel

/// Compile-time proof that every `@_cdecl` function has the type the header declares: each
/// pair below type-checks only if the Swift implementation and the imported C prototype agree.
private func sameType<F>(_ declared: F, _ implemented: F) {}

private func checkSignatures() {
    sameType(epGetErrorString, cGetErrorString)
    sameType(epGetLastErrorMessage, cGetLastErrorMessage)
    sameType(epGetAbiVersion, cGetAbiVersion)
    sameType(epGroupCreate, cGroupCreate)
    sameType(epGroupDestroy, cGroupDestroy)
    sameType(epGroupGetInfo, cGroupGetInfo)
    sameType(epGroupUpdateAll, cGroupUpdateAll)
    sameType(epGroupDispatchAll, cGroupDispatchAll)
    sameType(epGroupCombineAll, cGroupCombineAll)
    sameType(epGroupCheckStatus, cGroupCheckStatus)
    sameType(epGroupGetLayoutInfo, cGroupGetLayoutInfo)
    sameType(epGroupGetActiveRanks, cGroupGetActiveRanks)
    sameType(epGroupDeactivateRank, cGroupDeactivateRank)
    sameType(epGroupCleanRanks, cGroupCleanRanks)
    sameType(epHandleCreate, cHandleCreate)
    sameType(epHandleDestroy, cHandleDestroy)
    sameType(epHandleUpdate, cHandleUpdate)
    sameType(epDispatch, cDispatch)
    sameType(epCombine, cCombine)
    sameType(epGetNCCLUniqueId, cGetNCCLUniqueId)
    sameType(epGroupCreateNCCL, cGroupCreateNCCL)
    sameType(epGroupCopyReceived, cGroupCopyReceived)
}
