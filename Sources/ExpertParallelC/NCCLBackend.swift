import CExpertParallel
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU

/// This process's place in an NCCL-rank group, read from an `epNCCLRankConfig_t` and checked
/// before any library is opened.
struct NCCLRankSettings {
    var rank: Int
    var device: Int
    var multiprocessors: Int?
    var tuning: GPUTuning
    var uniqueID: [UInt8]
    var timeout: Duration

    init(_ c: epNCCLRankConfig_t, ranks: Int, _ name: String) throws(EPError) {
        guard c.rank >= 0, Int(c.rank) < ranks else {
            throw .invalidArgument(field: "\(name).rank", value: "\(c.rank)", requirement: "must be in 0..<\(ranks) (config.ranks)")
        }
        guard c.device >= 0 else {
            throw .invalidArgument(field: "\(name).device", value: "\(c.device)", requirement: "must be a CUDA device ordinal ≥ 0")
        }
        guard c.multiprocessors >= 0 else {
            throw .invalidArgument(field: "\(name).multiprocessors", value: "\(c.multiprocessors)", requirement: "must be ≥ 0 (0 = all)")
        }
        let seconds = c.initTimeoutSeconds
        guard seconds == 0 || (seconds.isFinite && seconds > 0 && seconds <= 1e6) else {
            throw .invalidArgument(field: "\(name).initTimeoutSeconds", value: "\(seconds)", requirement: "must be in (0, 1e6], or 0 for 60 s")
        }
        rank = Int(c.rank)
        device = Int(c.device)
        multiprocessors = c.multiprocessors == 0 ? nil : Int(c.multiprocessors)
        tuning = try GPUTuning(c.tuning, "\(name).tuning")
        uniqueID = withUnsafeBytes(of: c.uniqueId.bytes) { Array($0) }
        timeout = seconds == 0 ? .seconds(60) : .nanoseconds(max(1, Int64((seconds * 1e9).rounded())))   // (to the nearest ns, as timeoutSeconds)
    }
}

/// The group behind an `epGroup_t` made by `epGroupCreateNCCL`: this process's rank, the
/// communicator it joined, and the caller streams its calls were enqueued on.
final class NCCLBackend: @unchecked Sendable {
    let nccl: NCCLLibrary
    let comm: NCCLComm
    let rank: Int
    let timeout: Duration
    /// Where this rank's tensors live: its device.
    let location: MemoryLocation
    /// nil only while the backend goes: the group's buffers go before the communicator.
    private var joined: NCCLRankGroup?

    /// Opens NCCL and the device, joins the communicator and builds the group. Collective: every
    /// rank calls it with the same configuration and id.
    init(_ config: GroupConfig, _ settings: NCCLRankSettings) throws {
        let nccl = try ncclCall { try NCCLLibrary.shared() }
        let device = try DeviceCache.shared.device(settings.device)
        try device.makeCurrent()   // NCCL joins on the calling thread's current device
        let id = try ncclCall { try NCCLUniqueID(bytes: settings.uniqueID) }
        let comm = try ncclCall { try nccl.initRank(ranks: config.ranks, id: id, rank: settings.rank, timeout: settings.timeout) }
        do {
            joined = try NCCLRankGroup(config, device: device, comm: comm, nccl: nccl, multiprocessors: settings.multiprocessors,
                                       tuning: settings.tuning)
        } catch {
            try? nccl.abort(comm)
            // The group reports NCCL's failures (window registration, the handle exchange) as
            // EPError.lowerLayer with library .nccl, whose status is epNcclError.
            throw error
        }
        self.nccl = nccl
        self.comm = comm
        rank = settings.rank
        timeout = settings.timeout
        location = .device(settings.device)
    }

    deinit {
        joined = nil   // its buffers are windows of the communicator
        try? nccl.close(comm, timeout: timeout)
    }

    var group: NCCLRankGroup {
        get throws {
            guard let joined else { throw InternalError(message: "the NCCL-rank group is gone") }
            return joined
        }
    }
}

/// Runs an NCCL-layer call: its CUDA-layer errors become `EPError.lowerLayer`, whose status
/// follows the library that failed (a failed NCCL call, no libnccl or too old a one:
/// `epNcclError`; the driver: `epCudaError`). Other errors pass through unchanged.
func ncclCall<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let error as CUDAError {
        throw EPError(error)
    }
}
