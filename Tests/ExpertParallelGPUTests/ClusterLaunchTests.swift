import CExpertParallelShim
import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// The fused LL launch's EP_LL_CLUSTER experiment (ep_ll.cu): its dispatch blocks' prologue split
/// across thread-block clusters. The host launches in clusters only where the switch asks and
/// can take effect, with whole clusters a rank, every rank's clusters resident at once (over the
/// mock driver; the kernel's compile and registers are KernelDefineOverridesTests' and
/// KernelResourceTests', its bits the GPU suites' with the switch on).
@Suite(.serialized)
struct ClusterLaunchTests {
    @Test func theClusterAttributeHasCUDAsLayout() {
        // cuda.h: CUlaunchAttributeValue.clusterDim is three unsigned ints at the value's start.
        var attribute = ep_cu_launch_attribute()
        attribute.id = UInt32(EP_CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION)
        attribute.value.clusterDim.x = 4
        attribute.value.clusterDim.y = 5
        attribute.value.clusterDim.z = 6
        let bytes = withUnsafeBytes(of: &attribute) { Array($0) }
        #expect(bytes.count == 72)
        #expect(Array(bytes[0..<4]) == [4, 0, 0, 0])
        #expect(Array(bytes[8..<20]) == [4, 0, 0, 0, 5, 0, 0, 0, 6, 0, 0, 0])
        #expect(EP_CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION == 4)
    }

    /// ll-std on an H100 at R = 8: the items want 32 blocks a rank and the update block's spare
    /// makes 33, all the room there is (264 blocks: two per SM).
    @Test func theFusedLaunchTakesWholeClustersThatAllFitAtOnce() {
        func shape(_ blocks: Int, room: Int = 33, ranks: Int = 8, cluster: Int, max: Int) -> [Int] {
            let s = StepKernels.fusedLaunch(blocks: blocks, room: room, ranks: ranks, cluster: cluster, maxActiveClusters: max)
            return [s.blocks, s.cluster]
        }
        #expect(shape(33, cluster: 1, max: 0) == [33, 1], "no clusters: as before")
        #expect(shape(33, cluster: 2, max: 132) == [32, 2], "34 would not fit: down to 32, the spare gone")
        #expect(shape(33, cluster: 4, max: 66) == [32, 4])
        #expect(shape(33, cluster: 8, max: 32) == [32, 8])
        #expect(shape(33, cluster: 3, max: 88) == [33, 3], "11 clusters of 3 keep the spare")
        #expect(shape(33, cluster: 3, max: 84) == [30, 3], "10 clusters a rank fit at once")
        #expect(shape(5, cluster: 4, max: 66) == [8, 4], "few tokens: rounded up")
        #expect(shape(33, cluster: 4, max: 31) == [12, 4], "3 clusters a rank fit at once")
        #expect(shape(33, cluster: 4, max: 7) == [33, 1], "not one cluster a rank fits: no clusters")
        #expect(shape(2, room: 2, cluster: 4, max: 66) == [2, 1], "no room for one cluster")
        #expect(shape(264, room: 264, ranks: 1, cluster: 8, max: 32) == [256, 8], "one rank (an NCCL rank's launch)")
    }

    @Test func theSplitTakesEffectOnlyWhereItCan() throws {
        #expect(StepKernels.llClusterSize(requested: 4, findsOwnRows: true, shareFits: true, deviceLaunchesClusters: true) == 4)
        #expect(StepKernels.llClusterSize(requested: 1, findsOwnRows: true, shareFits: true, deviceLaunchesClusters: true) == 1)
        #expect(StepKernels.llClusterSize(requested: 4, findsOwnRows: false, shareFits: true, deviceLaunchesClusters: true) == 1)
        #expect(StepKernels.llClusterSize(requested: 4, findsOwnRows: true, shareFits: false, deviceLaunchesClusters: true) == 1)
        #expect(StepKernels.llClusterSize(requested: 4, findsOwnRows: true, shareFits: true, deviceLaunchesClusters: false) == 1)
        let llStandard = try KernelResourceTests.llStandard.validated()
        #expect(llStandard.llClusterShareFits)
        #expect(llStandard.llClusterShareSharedMemoryBytes == 4 * 258 + 8)
        #expect(try !KernelResourceTests.htStandard.validated().llClusterShareFits)
        // K > 8 at R > 1: the dispatch blocks wait for the update's rows; nothing to split.
        let wide = try GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 9, hidden: 7168, maxTokensPerRank: 128).validated()
        #expect(!wide.llClusterShareFits)
    }

    /// An LL group of 8 virtual ranks, its stacked dispatch (one fused launch) with `switches`.
    static func fusedLaunch(_ mock: MockCUDA.State, device: GPUDevice, switches: [String: String]?, tuning: GPUTuning = GPUTuning())
        throws -> (kernel: String, grid: (x: UInt32, y: UInt32), cluster: UInt32, dependent: Bool, llCluster: Int) {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 64, topK: 8, hidden: 128, maxTokensPerRank: 128)
        let group = try VirtualGPUGroup(config, device: device, tuning: tuning)
        group.engine.kernelDefineOverrides = switches
        let r = config.ranks
        let a = try StackedCallMockTests.Arrays(config, tokens: config.maxTokensPerRank - 1, device: device)
        let handle = try group.makeHandle()
        defer { handle.release() }
        let first = mock.launchedKernels.count
        try group.dispatch(handle, topkIdx: (0..<r).map { a.part("idx", $0)! }, (0..<r).map(a.dispatchInput),
                           into: (0..<r).map(a.dispatchOutput), options: .init(nil))
        #expect(mock.launchedKernels.count == first + 1)
        let k = try group.engine.kernels(.init(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: 16))
        return (mock.launchedKernels[first], mock.launchedGrids[first], mock.launchedClusters[first], mock.launchedDependent[first], k.llCluster)
    }

    @Test func theFusedLaunchGoesInClustersWhereTheSwitchAsks() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            #expect(device.launchesClusters, "the mock is compute capability 9.0 with cuLaunchKernelEx and cuOccupancyMaxActiveClusters")
            let plain = try Self.fusedLaunch(mock, device: device, switches: [:])
            #expect(plain.kernel == "ep_ll_update_dispatch" && plain.cluster == 1 && plain.llCluster == 1 && plain.dependent)
            #expect(plain.grid.y == 8)
            for size in [2, 4, 8] {
                let clustered = try Self.fusedLaunch(mock, device: device, switches: ["EP_LL_CLUSTER": "\(size)"])
                #expect(clustered.kernel == "ep_ll_update_dispatch" && clustered.llCluster == size)
                #expect(clustered.cluster == UInt32(size) && clustered.dependent, "the cluster dimension and the dependent launch, together")
                #expect(clustered.grid.x == (plain.grid.x + UInt32(size) - 1) / UInt32(size) * UInt32(size) && clustered.grid.y == 8)
            }
            let serial = try Self.fusedLaunch(mock, device: device, switches: ["EP_LL_CLUSTER": "4"], tuning: GPUTuning(overlapsLaunches: false))
            #expect(serial.cluster == 4 && !serial.dependent, "a plain launch still goes in clusters (cuLaunchKernelEx)")
            // Every rank's clusters must fit at once; where not one cluster a rank does, none.
            mock.maxActiveClusters = { _ in 7 }
            let crowded = try Self.fusedLaunch(mock, device: device, switches: ["EP_LL_CLUSTER": "4"])
            #expect(crowded.llCluster == 4 && crowded.cluster == 1 && crowded.grid.x == plain.grid.x)
        }
    }

    @Test func withoutClustersTheSwitchIsLeftOut() throws {
        try MockCUDA.run { mock in
            let older = try MockCUDA.device(leaving: ["cuOccupancyMaxActiveClusters"])
            #expect(!older.launchesClusters)
            let launch = try Self.fusedLaunch(mock, device: older, switches: ["EP_LL_CLUSTER": "4"])
            #expect(launch.llCluster == 1 && launch.cluster == 1)
            // Dispatch blocks that wait for the update's rows have no prologue to split.
            let device = try MockCUDA.device()
            let waiting = try Self.fusedLaunch(mock, device: device, switches: ["EP_LL_CLUSTER": "4", "EP_LL_OWN_ROWS": "0"])
            #expect(waiting.kernel == "ep_ll_update_dispatch" && waiting.llCluster == 1 && waiting.cluster == 1)
        }
    }

    @Test func aClusterLaunchNeedsLaunchKernelEx() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device(leaving: ["cuLaunchKernelEx"])
            #expect(!device.launchesClusters)
            let function = try device.driver.function(named: "ep_ll_update_dispatch", in: CUDAModule(rawValue: OpaquePointer(bitPattern: 0x1)!))
            #expect(throws: CUDAError.symbolMissing(library: DriverLibrary.libraryName, symbol: "cuLaunchKernelEx")) {
                try device.driver.launch(function, grid: .init(x: 8, y: 2), block: .init(x: 512), stream: .legacyDefault, dependent: false,
                                         cluster: 4, parameters: nil)
            }
            try device.driver.launch(function, grid: .init(x: 8, y: 2), block: .init(x: 512), stream: .legacyDefault, dependent: false, parameters: nil)
            #expect(mock.launchedClusters == [1])
        }
    }
}
