import CExpertParallelShim
import Testing

/// The non-blocking `ncclConfig_t` prefix handed to NCCL.
struct NCCLConfigTests {
    /// NCCL reads `size`, `magic` and `version` to know which fields it was given.
    @Test func theNonBlockingConfigIsWhatNCCLConfigInitializerMakes() {
        let config = ep_shim_nccl_config(0)
        #expect(config.size == UInt(MemoryLayout<ep_nccl_config>.size))
        #expect(config.magic == 0xcafe_beef)
        #expect(config.version == 21400)
        #expect(config.blocking == 0)
        #expect(config.cgaClusterSize == Int32.min && config.minCTAs == Int32.min && config.maxCTAs == Int32.min)
        #expect(config.netName == nil && config.splitShare == Int32.min)
        #expect(ep_shim_nccl_config(1).blocking == 1)
    }
}
