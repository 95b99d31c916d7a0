import CExpertParallel
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU

// NCCL-rank groups: the unique id rank 0 hands out, and creating this process's rank.

@_cdecl("epGetNCCLUniqueId")
public func cGetNCCLUniqueId(_ id: UnsafeMutablePointer<epNCCLUniqueId_t>?) -> epResult_t {
    entryPoint("epGetNCCLUniqueId") {
        let result = try required(id, "id")
        let bytes = try ncclCall { try NCCLLibrary.shared().uniqueID().bytes }
        var value = epNCCLUniqueId_t()
        withUnsafeMutableBytes(of: &value.bytes) { $0.copyBytes(from: bytes.prefix($0.count)) }
        UnsafeMutableRawPointer(result).storeBytes(of: value, as: epNCCLUniqueId_t.self)
    }
}

@_cdecl("epGroupCreateNCCL")
public func cGroupCreateNCCL(
    _ config: UnsafePointer<epGroupConfig_t>?, _ ncclRank: UnsafePointer<epNCCLRankConfig_t>?,
    _ group: UnsafeMutablePointer<epGroup_t?>?
) -> epResult_t {
    entryPoint("epGroupCreateNCCL") {
        let result = try required(group, "group")
        // Every bound is checked before NCCL or the device is asked, on every rank alike.
        let config = try GroupConfig(try epGroupConfig_t.read(config, "config")).validatedForGPU()
        var settings = try NCCLRankSettings(try epNCCLRankConfig_t.read(ncclRank, "ncclRank"), ranks: config.ranks, "ncclRank")
        settings.tuning = try settings.tuning.validated(config, as: "ncclRank.tuning")   // before NCCL or the device is opened
        let backend = try NCCLBackend(config, settings)
        result.pointee = groupRegistry.add(GroupObject(config: try backend.group.config, backend: backend))
    }
}
