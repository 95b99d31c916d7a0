import ExpertParallelCUDA
import Foundation

/// Who this process is in an NCCL-rank run, and how the ranks find each other: spawned by
/// `ep-bench --transport nccl` (EP_NCCL_RANK, EP_NCCL_WORLD, EP_NCCL_ID), or started by
/// `mpirun` (OMPI_COMM_WORLD_*) or `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK), where rank 0
/// writes the NCCL id to a file the others read (EP_NCCL_ID_FILE, or one per job in /tmp).
public struct NCCLRankEnvironment: Sendable, Equatable {
    public var rank: Int
    public var world: Int
    public var deviceOrdinal: Int
    public var idHex: String?
    public var idFile: String?

    public init(rank: Int, world: Int, deviceOrdinal: Int, idHex: String?, idFile: String?) {
        self.rank = rank
        self.world = world
        self.deviceOrdinal = deviceOrdinal
        self.idHex = idHex
        self.idFile = idFile
    }

    public static func current(_ environment: [String: String] = ProcessInfo.processInfo.environment) -> NCCLRankEnvironment? {
        func int(_ key: String) -> Int? { environment[key].flatMap(Int.init) }
        if let rank = int("EP_NCCL_RANK"), let world = int("EP_NCCL_WORLD") {
            return .init(rank: rank, world: world, deviceOrdinal: int("EP_NCCL_DEVICE") ?? rank, idHex: environment["EP_NCCL_ID"], idFile: nil)
        }
        let job = environment["OMPI_MCA_orte_ess_jobid"] ?? environment["TORCHELASTIC_RUN_ID"] ?? environment["MASTER_PORT"] ?? "default"
        let file = environment["EP_NCCL_ID_FILE"] ?? "/tmp/expert-parallel-nccl-id-\(job)"
        if let rank = int("OMPI_COMM_WORLD_RANK"), let world = int("OMPI_COMM_WORLD_SIZE") {
            return .init(rank: rank, world: world, deviceOrdinal: int("OMPI_COMM_WORLD_LOCAL_RANK") ?? rank, idHex: nil, idFile: file)
        }
        if let rank = int("RANK"), let world = int("WORLD_SIZE") {
            return .init(rank: rank, world: world, deviceOrdinal: int("LOCAL_RANK") ?? rank, idHex: nil, idFile: file)
        }
        return nil
    }

    /// The communicator's id: given, or written by rank 0 to the id file and read by the others
    /// (waiting at most `timeout`).
    public func uniqueID(_ nccl: NCCLLibrary?, timeout: Duration) throws -> NCCLUniqueID {
        if let idHex { return try NCCLUniqueID(hex: idHex) }
        guard let idFile else { throw CUDAError.nccl(call: "uniqueID", code: 4, name: "ncclInvalidArgument \"no id and no id file\"") }
        if rank == 0 {
            guard let nccl else { throw CUDAError.libraryUnavailable(library: NCCLLibrary.libraryName, attempts: []) }
            let id = try nccl.uniqueID()
            let temporary = idFile + ".\(getpid()).tmp"
            try id.hex.write(toFile: temporary, atomically: false, encoding: .utf8)
            guard rename(temporary, idFile) == 0 else { throw CUDAError.nccl(call: "rename", code: 2, name: "ncclSystemError \"\(idFile)\"") }
            return id
        }
        var id: NCCLUniqueID?
        let written = poll(every: .milliseconds(20), for: timeout) {
            id = (try? String(contentsOfFile: idFile, encoding: .utf8)).flatMap { try? NCCLUniqueID(hex: $0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            return id != nil
        }
        if written, let id { return id }
        throw CUDAError.nccl(call: "uniqueID", code: 2, name: "ncclSystemError \"rank 0 wrote no id to \(idFile) within \(timeout)\"")
    }
}
