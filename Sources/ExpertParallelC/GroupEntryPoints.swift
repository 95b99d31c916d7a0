import CExpertParallel
import ExpertParallel
import ExpertParallelGPU

// Creating, describing and destroying groups; the active-rank mask.

@_cdecl("epGroupCreate")
public func cGroupCreate(
    _ config: UnsafePointer<epGroupConfig_t>?, _ backend: UnsafePointer<epBackendConfig_t>?,
    _ group: UnsafeMutablePointer<epGroup_t?>?
) -> epResult_t {
    entryPoint("epGroupCreate") {
        let result = try required(group, "group")
        let config = try GroupConfig(try epGroupConfig_t.read(config, "config"))
        let choice = try epBackendConfig_t.readOptional(backend, "backend")
        let object: GroupObject
        switch choice?.backend ?? epBackendHost {
        case epBackendHost:
            // The host backend runs no kernels, but refuses the tuning a GPU group would (same
            // checks, same words): code that runs on the CPU does not fail later on the GPU. Its
            // device and SM count must be 0 (BackendChoice).
            try BackendChoice.hostFields(device: choice?.device ?? 0, multiprocessors: choice?.multiprocessors ?? 0)
            _ = try GPUTuning(choice?.tuning ?? epGPUTuning_t(), "backend.tuning").validated(config, as: "backend.tuning")
            object = GroupObject(config: config, backend: try HostBackend(try HostGroup(config)))
        case epBackendVirtualGPU:
            let ordinal = choice?.device ?? 0, multiprocessors = choice?.multiprocessors ?? 0
            try BackendChoice.gpuFields(device: ordinal, multiprocessors: multiprocessors)
            let tuning = try GPUTuning(choice?.tuning ?? epGPUTuning_t(), "backend.tuning").validated(config, as: "backend.tuning")
            let device = try DeviceCache.shared.device(Int(ordinal))
            let gpu = try VirtualGPUGroup(config, device: device, multiprocessors: multiprocessors == 0 ? nil : Int(multiprocessors),
                                          tuning: tuning)
            object = GroupObject(config: config, backend: try GPUBackend(gpu))
        case epBackendNCCLRank:
            throw UnsupportedCall(message: "backend.backend = epBackendNCCLRank: an NCCL-rank group is made by epGroupCreateNCCL")
        case let other:
            throw ABIEnum.invalid("backend.backend", other.rawValue, "epBackendHost (0), epBackendVirtualGPU (1)")
        }
        result.pointee = groupRegistry.add(object)
    }
}

@_cdecl("epGroupDestroy")
public func cGroupDestroy(_ group: epGroup_t?) -> epResult_t {
    entryPoint("epGroupDestroy", clearing: false) {
        try groupRegistry.remove(group, "group")
    }
}

@_cdecl("epGroupGetInfo")
public func cGroupGetInfo(_ group: epGroup_t?, _ info: UnsafeMutablePointer<epGroupInfo_t>?) -> epResult_t {
    entryPoint("epGroupGetInfo") {
        let object = try groupRegistry.object(group, "group")
        _ = try epGroupInfo_t.read(info, "info")
        var value = object.config.info(backend: object.backendKind)
        try object.withBackend { backend in
            value.bufferSlots = Int32(backend.bufferSlots)
            value.multiprocessors = Int32(backend.multiprocessors)
        }
        write(value, to: UnsafeMutableRawPointer(try required(info, "info")))
    }
}

@_cdecl("epGroupGetActiveRanks")
public func cGroupGetActiveRanks(_ group: epGroup_t?, _ mask: UnsafeMutablePointer<UInt64>?) -> epResult_t {
    entryPoint("epGroupGetActiveRanks") {
        let object = try groupRegistry.object(group, "group")
        let mask = try required(mask, "mask")
        mask.pointee = try object.withBackend { try $0.activeRanks() }.bits
    }
}

@_cdecl("epGroupDeactivateRank")
public func cGroupDeactivateRank(_ group: epGroup_t?, _ rank: Int32) -> epResult_t {
    entryPoint("epGroupDeactivateRank") {
        let object = try groupRegistry.object(group, "group")
        let rank = try object.checkRank(rank)
        try object.withBackend { try $0.deactivate(rank: rank) }
    }
}

@_cdecl("epGroupCleanRanks")
public func cGroupCleanRanks(_ group: epGroup_t?, _ mask: UInt64) -> epResult_t {
    entryPoint("epGroupCleanRanks") {
        let object = try groupRegistry.object(group, "group")
        let ranks = RankMask(bits: mask & RankMask.all(object.config.ranks).bits)
        try object.withBackend { try $0.clean(ranks: ranks) }
    }
}

extension GPUTuning {
    /// The knobs of an `epGPUTuning_t` (0: the default), each checked to be ≥ 0 here and against
    /// its bounds by `validated`.
    init(_ c: epGPUTuning_t, _ name: String) throws(EPError) {
        let defaults = GPUTuning()
        func knob(_ value: Int32, _ field: String) throws(EPError) -> Int? {
            guard value >= 0 else {
                throw .invalidArgument(field: "\(name).\(field)", value: "\(value)", requirement: "must be ≥ 0 (0 = the default)")
            }
            return value == 0 ? nil : Int(value)
        }
        // A switch: 0 its default, 1 `on`, 2 `off`.
        func choice(_ value: Int32, _ field: String, on: String, off: String, default isOn: Bool, automatic: String? = nil) throws(EPError) -> Bool {
            guard (0...2).contains(value) else {
                throw .invalidArgument(field: "\(name).\(field)", value: "\(value)",
                                       requirement: "must be 0 (default: \(automatic ?? (isOn ? on : off))), 1 (\(on)) or 2 (\(off))")
            }
            return value == 0 ? isOn : value == 1
        }
        // 0 leaves it automatic (GPUTuning.fusesUpdate nil): on but at an NCCL rank with peers.
        let fusesUpdate: Bool? = c.fusedUpdate == 0 ? defaults.fusesUpdate
            : try choice(c.fusedUpdate, "fusedUpdate", on: "on", off: "off", default: true, automatic: "on, but off at an NCCL rank with peers")
        let fitsGridToWork = try choice(c.launchGrid, "launchGrid", on: "fitted", off: "every SM's", default: defaults.fitsGridToWork)
        let overlapsLaunches = try choice(c.launches, "launches", on: "dependent", off: "plain", default: defaults.overlapsLaunches)
        self.init(pipelineDepth: try knob(c.pipelineDepth, "pipelineDepth") ?? defaults.pipelineDepth,
                  rowsInFlight: try knob(c.rowsInFlight, "rowsInFlight") ?? defaults.rowsInFlight,
                  rowPieces: try knob(c.rowPieces, "rowPieces"),
                  blocksPerMultiprocessor: try knob(c.blocksPerMultiprocessor, "blocksPerMultiprocessor"),
                  fusesUpdate: fusesUpdate,
                  updateChunkTokens: try knob(c.updateChunkTokens, "updateChunkTokens") ?? defaults.updateChunkTokens,
                  fitsGridToWork: fitsGridToWork, overlapsLaunches: overlapsLaunches)
    }
}
