import ExpertParallel
import ExpertParallelCUDA

/// The staged transport's staging areas, one per rank (`EpStage` of ep_transport.cuh): a mirror
/// of the receive buffers that dispatch puts into and the destination drains, and the rows (with
/// slot weights and weight gradients) that combine's expert side puts back for the source to
/// reduce. (Each received row's origin is per step: it lives in the step's handle.) Owned by the
/// group; freed after its work is done.
final class StepStaging {
    /// Each rank's `EpStage` descriptor (seven device addresses) in device memory.
    let descriptors: [DevicePointer]
    private var allocations: [DevicePointer] = []
    private let driver: DriverLibrary

    init(_ config: GroupConfig, device: GPUDevice) throws(EPError) {
        let driver = device.driver
        self.driver = driver
        let capacity = config.receiveCapacity
        let routing = config.receiveRoutingShape?.reduce(1, *) ?? 0
        // Rows a source gets back per token: one per selection (expert-major), one per rank (else).
        let fan = config.layout == .expertMajor || config.isExpertMajorHT ? config.topK : config.ranks
        let backRows = config.maxTokensPerRank * fan
        let sizes = [
            capacity * config.rowBytes,                               // rows
            max(routing, 1) * 8,                                      // ids (up to 8 bytes each)
            max(routing, 1) * 4,                                      // weights
            backRows * config.rowBytes,                               // combine rows
            backRows * 4,                                             // combine slot weights
            config.maxTokensPerRank * config.ranks * config.topK * 4, // combine weight gradients
            capacity * max(config.fp8Format?.scaleWordsPerRow ?? 0, 1) * 4,  // FP8 scale words
        ]
        var descriptors: [DevicePointer] = [], allocations: [DevicePointer] = []
        do {
            for _ in 0..<config.ranks {
                var addresses: [UInt64] = []
                for bytes in sizes {
                    let p = try device.allocateZeroed(byteCount: bytes)
                    allocations.append(p)
                    addresses.append(p.rawValue)
                }
                let descriptor = try gpu { try driver.allocate(byteCount: addresses.count * 8) }
                allocations.append(descriptor)
                try gpu { try driver.copy(addresses, to: descriptor) }
                descriptors.append(descriptor)
            }
            try device.waitForLegacyStream()   // the descriptors' copies, before any kernel reads them
        } catch {
            for p in allocations { try? driver.free(p) }
            throw error
        }
        self.descriptors = descriptors
        self.allocations = allocations
    }

    deinit { for p in allocations { try? driver.free(p) } }

    /// The staged transport's own bound: a received row's origin word (ep_put_origin) keeps the
    /// row's index at its source (token × K + k in the expert-major layouts, else the token) in 26 bits.
    static func check(_ config: GroupConfig) throws(EPError) {
        let expertMajor = config.layout == .expertMajor || config.isExpertMajorHT
        let indices = expertMajor ? config.maxTokensPerRank * config.topK : config.maxTokensPerRank
        guard indices <= 1 << originIndexBits else {
            throw .invalidConfig(
                field: "maxTokensPerRank", value: "\(config.maxTokensPerRank)",
                requirement: "with topK \(config.topK) must leave at most \(1 << originIndexBits) rows a source (the staged transport numbers them in \(originIndexBits) bits)")
        }
    }

    /// EP_ORIGIN_INDEX_BITS of ep_transport.cuh.
    static let originIndexBits = 26
}
