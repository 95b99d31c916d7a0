import ExpertParallelCUDA
import Testing

/// NCCL 2.29's host peer-pointer queries (`ncclGetPeerDevicePointer`, `ncclGetLsaDevicePointer`),
/// loaded as optional symbols, over a table of C functions standing in for `libnccl.so.2` (the
/// GPU machines load NCCL 2.28, which has neither, so no real NCCL answers them yet).
struct NCCLPeerPointerTests {
    private static func symbol<F>(_ function: F) -> UnsafeRawPointer { unsafeBitCast(function, to: UnsafeRawPointer.self) }

    typealias Query = @convention(c) (OpaquePointer?, Int, Int32, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Int32

    /// Rank p's part of a window at `window + offset + (p + 1) * 2^32`; rank 3 is out of reach
    /// (NULL); a negative rank is ncclInvalidArgument.
    private static let peerQuery: Query = { window, offset, peer, out in
        guard peer >= 0 else { return 4 }
        out?.pointee = peer == 3 ? nil : UnsafeMutableRawPointer(bitPattern: UInt(bitPattern: window) + UInt(offset) + UInt(peer + 1) << 32)
        return 0
    }

    /// An LSA team of ranks 0...2: rank 3 and beyond are ncclInvalidArgument.
    private static let lsaQuery: Query = { window, offset, lsaRank, out in
        guard lsaRank >= 0, lsaRank < 3 else { return 4 }
        out?.pointee = UnsafeMutableRawPointer(bitPattern: UInt(bitPattern: window) + UInt(offset) + UInt(lsaRank + 1) << 32)
        return 0
    }

    private static func nccl(_ extra: [String: UnsafeRawPointer]) throws -> NCCLLibrary {
        var table: [String: UnsafeRawPointer] = [
            "ncclGetVersion": symbol({ $0?.pointee = 22_902; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32),
            "ncclGetErrorString": symbol({ _ in nil } as @convention(c) (Int32) -> UnsafePointer<CChar>?),
        ]
        table.merge(extra) { $1 }
        return try NCCLLibrary(library: DynamicLibrary(name: NCCLLibrary.libraryName, symbols: table))
    }

    private let window = NCCLWindow(rawValue: OpaquePointer(bitPattern: 0x10_0000)!)

    /// NCCL 2.28: no query, so `PeerBuffers` passes descriptors instead.
    @Test func anNCCLWithoutTheQueriesOffersNoPeerPointers() throws {
        let nccl = try Self.nccl([:])
        #expect(!nccl.offersPeerPointers)
        #expect(try nccl.peerPointer(window, peer: 1, ranks: 2) == nil)
    }

    @Test func ncclGetPeerDevicePointerGivesEachPeersWindowOrNilWhereUnreachable() throws {
        let nccl = try Self.nccl(["ncclGetPeerDevicePointer": Self.symbol(Self.peerQuery), "ncclGetLsaDevicePointer": Self.symbol(Self.lsaQuery)])
        #expect(nccl.offersPeerPointers)
        #expect(try nccl.peerPointer(window, peer: 1, ranks: 4) == DevicePointer(rawValue: 0x10_0000 + 2 << 32))
        #expect(try nccl.peerPointer(window, offset: 64, peer: 2, ranks: 4) == DevicePointer(rawValue: 0x10_0000 + 64 + 3 << 32))
        #expect(try nccl.peerPointer(window, peer: 3, ranks: 4) == nil)   // the peer query wins over the LSA one
        #expect(throws: CUDAError.self) { _ = try nccl.peerPointer(window, peer: -1, ranks: 4) }
    }

    /// Only `ncclGetLsaDevicePointer`: used when the LSA team is the whole communicator (LSA
    /// ranks are then world ranks), nil otherwise.
    @Test func ncclGetLsaDevicePointerIsUsedOnlyWhenTheLSATeamIsEveryRank() throws {
        let nccl = try Self.nccl(["ncclGetLsaDevicePointer": Self.symbol(Self.lsaQuery)])
        #expect(nccl.offersPeerPointers)
        #expect(try nccl.peerPointer(window, peer: 2, ranks: 3) == DevicePointer(rawValue: 0x10_0000 + 3 << 32))
        #expect(try nccl.peerPointer(window, peer: 1, ranks: 4) == nil)
    }
}
