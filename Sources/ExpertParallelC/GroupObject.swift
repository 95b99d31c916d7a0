import CExpertParallel
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation

/// What an `epGroup_t` points at: a group of R ranks on one backend, plus the per-step state
/// the collective calls keep for the caller.
final class GroupObject: @unchecked Sendable {
    let config: GroupConfig
    let backend: Backend
    /// Serialises the collective calls (not the per-rank calls, which wait for each other).
    let lock = NSLock()

    enum Backend {
        case host(HostBackend)
        case gpu(GPUBackend)
    }

    init(config: GroupConfig, backend: Backend) {
        self.config = config
        self.backend = backend
    }

    var backendKind: epBackend_t {
        switch backend {
        case .host: epBackendHost
        case .gpu: epBackendVirtualGPU
        }
    }

    func checkRank(_ rank: Int32, _ name: String = "rank") throws(EPError) -> Int {
        guard rank >= 0, Int(rank) < config.ranks else {
            throw .invalidArgument(field: name, value: "\(rank)", requirement: "must be in 0..<\(config.ranks)")
        }
        return Int(rank)
    }
}

/// The host group and the handles its collective calls use, one per rank.
final class HostBackend: @unchecked Sendable {
    let group: HostGroup
    let handles: [HostHandle]
    /// What each rank received in the last collective dispatch.
    var lastLayout: [LayoutInfo?]

    init(_ group: HostGroup) throws(EPError) {
        self.group = group
        var handles: [HostHandle] = []
        for rank in group.ranks { handles.append(try rank.makeHandle()) }
        self.handles = handles
        lastLayout = Array(repeating: nil, count: group.config.ranks)
    }
}

/// The virtual GPU group and the caller streams its calls were enqueued on since the last
/// status check (the group's own `checkStatus` waits only for its own stream).
final class GPUBackend: @unchecked Sendable {
    let group: VirtualGPUGroup
    var callerStreams: [CUDAStream] = []

    init(_ group: VirtualGPUGroup) { self.group = group }
}

/// What an `epHandle_t` points at: one rank of a host group and its handle.
final class HandleObject: @unchecked Sendable {
    let group: GroupObject
    let rank: HostRank
    let handle: HostHandle

    init(group: GroupObject, rank: HostRank, handle: HostHandle) {
        self.group = group
        self.rank = rank
        self.handle = handle
    }
}

/// Devices opened by GPU groups, one per ordinal, shared by the groups on it.
final class DeviceCache: @unchecked Sendable {
    private let lock = NSLock()
    private var devices: [Int: GPUDevice] = [:]

    static let shared = DeviceCache()

    func device(_ ordinal: Int) throws(EPError) -> GPUDevice {
        lock.lock()
        defer { lock.unlock() }
        if let device = devices[ordinal] { return device }
        let device = try GPUDevice(ordinal: ordinal)
        devices[ordinal] = device
        return device
    }
}
