import ExpertParallelCUDA
import ExpertParallelGPU
import Testing

/// `NCCLLibrary.initRank` took the ranks and the rank as `Int32(...)`: a launcher's RANK or
/// WORLD_SIZE past 32 bits (ep-bench --transport nccl reads them from the environment) trapped.
struct NCCLInitRankBoundsMockTests {
    @Test(arguments: [(1 << 32, 0), (2, 1 << 32), (0, 0), (2, -1), (2, 2), (Int.max, 0)])
    func ranksOutsideThirtyTwoBitsAreAnInvalidArgument(_ ranks: Int, _ rank: Int) throws {
        let nccl = try MockCUDA.nccl()
        let id = try NCCLUniqueID(bytes: [UInt8](repeating: 7, count: NCCLUniqueID.byteCount))
        #expect(throws: CUDAError.nccl(call: "ncclCommInitRankConfig", code: 4,
                                       name: "ncclInvalidArgument \"rank \(rank) of \(ranks) ranks: ranks must be in 1...2147483647 and rank in 0..<ranks\"")) {
            _ = try nccl.initRank(ranks: ranks, id: id, rank: rank, timeout: .milliseconds(100))
        }
    }
}
