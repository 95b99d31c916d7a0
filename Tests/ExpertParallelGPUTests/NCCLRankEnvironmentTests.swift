import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation
import Testing

/// How a process learns its NCCL rank: spawned by ep-bench, or started by mpirun or torchrun.
struct NCCLRankEnvironmentTests {
    @Test func spawnedRanksReadTheirRankWorldAndId() {
        let me = NCCLRankEnvironment.current(["EP_NCCL_RANK": "1", "EP_NCCL_WORLD": "2", "EP_NCCL_ID": "ab"])
        #expect(me == NCCLRankEnvironment(rank: 1, world: 2, deviceOrdinal: 1, idHex: "ab", idFile: nil))
    }

    @Test func mpirunRanksUseTheLocalRankAsDeviceAndAJobIdFile() {
        let me = NCCLRankEnvironment.current([
            "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_MCA_orte_ess_jobid": "77",
        ])
        #expect(me == NCCLRankEnvironment(rank: 3, world: 4, deviceOrdinal: 1, idHex: nil, idFile: "/tmp/expert-parallel-nccl-id-77"))
    }

    @Test func torchrunRanksHonourAnExplicitIdFile() {
        let me = NCCLRankEnvironment.current(["RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "EP_NCCL_ID_FILE": "/tmp/x"])
        #expect(me == NCCLRankEnvironment(rank: 0, world: 2, deviceOrdinal: 0, idHex: nil, idFile: "/tmp/x"))
    }

    @Test func noLauncherMeansNoRank() {
        #expect(NCCLRankEnvironment.current(["HOME": "/root"]) == nil)
    }

    /// A rank other than 0 reads the id that rank 0 wrote; with none, it gives up after the timeout.
    @Test func nonZeroRanksReadTheIdFileOrTimeOut() throws {
        let file = NSTemporaryDirectory() + "ep-nccl-id-test-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: file) }
        let rank1 = NCCLRankEnvironment(rank: 1, world: 2, deviceOrdinal: 1, idHex: nil, idFile: file)
        let nccl: NCCLLibrary? = nil
        let id = try NCCLUniqueID(bytes: (0..<128).map { UInt8($0) })
        try id.hex.write(toFile: file, atomically: true, encoding: .utf8)
        #expect(try rank1.uniqueID(nccl, timeout: .milliseconds(200)) == id)
        try FileManager.default.removeItem(atPath: file)
        let start = ContinuousClock.now
        #expect(throws: CUDAError.self) { try rank1.uniqueID(nccl, timeout: .milliseconds(200)) }
        #expect(ContinuousClock.now - start < .seconds(5))
    }
}
