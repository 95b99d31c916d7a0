import CExpertParallelShim
import ExpertParallelCUDA
import Testing

/// The C trampolines pass the 128-byte `ncclUniqueId` and the 64-byte `CUipcMemHandle` by value,
/// byte for byte, to the function they are given.
@Suite("Struct-by-value trampolines")
struct ShimTests {
    static func checksum(_ bytes: [UInt8]) -> UInt64 {
        bytes.enumerated().reduce(0) { $0 + UInt64($1.element) * UInt64($1.offset + 1) }
    }

    @Test func uniqueIdReachesTheCalleeByValue() throws {
        let bytes = (0..<128).map { UInt8(truncatingIfNeeded: $0 * 37 + 11) }
        var id = ep_nccl_unique_id()
        withUnsafeMutableBytes(of: &id) { $0.copyBytes(from: bytes) }
        let callee = unsafeBitCast(ep_shim_test_checksum_unique_id as @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>?, Int32, ep_nccl_unique_id, Int32) -> Int32, to: UnsafeRawPointer.self)
        var out: UnsafeMutableRawPointer?
        #expect(ep_shim_nccl_comm_init_rank(callee, &out, 8, &id, 3) == 0)
        #expect(UInt64(UInt(bitPattern: out)) == Self.checksum(bytes) + 8 * 1_000_003 + 3)
    }

    @Test func ipcHandleReachesTheCalleeByValue() throws {
        let bytes = (0..<64).map { UInt8(truncatingIfNeeded: 255 - $0 * 3) }
        var handle = ep_cu_ipc_mem_handle()
        withUnsafeMutableBytes(of: &handle) { $0.copyBytes(from: bytes) }
        let callee = unsafeBitCast(ep_shim_test_checksum_ipc_handle as @convention(c) (UnsafeMutablePointer<UInt64>?, ep_cu_ipc_mem_handle, UInt32) -> Int32, to: UnsafeRawPointer.self)
        var out: UInt64 = 0
        #expect(ep_shim_cu_ipc_open_mem_handle(callee, &out, &handle, 1) == 0)
        #expect(out == Self.checksum(bytes) * 10 + 1)
    }

    @Test func uniqueIdTravelsAsHex() throws {
        let id = try NCCLUniqueID(bytes: (0..<128).map { UInt8($0 * 2 % 256) })
        #expect(id.hex.count == 256)
        #expect(try NCCLUniqueID(hex: id.hex) == id)
        #expect(throws: CUDAError.self) { try NCCLUniqueID(hex: "abc") }
        #expect(throws: CUDAError.self) { try NCCLUniqueID(hex: String(repeating: "zz", count: 128)) }
        #expect(throws: CUDAError.self) { try NCCLUniqueID(bytes: [1, 2, 3]) }
        #expect(throws: CUDAError.self) { try IPCMemHandle(bytes: [UInt8](repeating: 0, count: 63)) }
    }
}
