import CExpertParallelShim

/// `ncclUniqueId`: 128 opaque bytes that rank 0 creates and every rank passes to `initRank`.
public struct NCCLUniqueID: Sendable, Hashable {
    public static let byteCount = 128
    public var bytes: [UInt8]

    /// Wraps bytes received from rank 0 (a file, an environment variable, a socket).
    public init(bytes: [UInt8]) throws {
        guard bytes.count == Self.byteCount else {
            throw CUDAError.nccl(call: "NCCLUniqueID(bytes:)", code: 4, name: "ncclInvalidArgument \"\(bytes.count) bytes, need \(Self.byteCount)\"")
        }
        self.bytes = bytes
    }

    /// Hex text, for passing the id to other processes in an environment variable.
    public var hex: String { bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined() }

    public init(hex: String) throws {
        let characters = Array(hex.utf8)
        guard characters.count == Self.byteCount * 2 else {
            throw CUDAError.nccl(call: "NCCLUniqueID(hex:)", code: 4, name: "ncclInvalidArgument \"\(characters.count) hex digits, need \(Self.byteCount * 2)\"")
        }
        var bytes: [UInt8] = []
        for i in stride(from: 0, to: characters.count, by: 2) {
            guard let byte = UInt8(String(decoding: characters[i..<(i + 2)], as: UTF8.self), radix: 16) else {
                throw CUDAError.nccl(call: "NCCLUniqueID(hex:)", code: 4, name: "ncclInvalidArgument \"not hex at \(i)\"")
            }
            bytes.append(byte)
        }
        try self.init(bytes: bytes)
    }

    var shimValue: ep_nccl_unique_id {
        var value = ep_nccl_unique_id()
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes) }
        return value
    }
}

/// An `ncclComm_t`.
public struct NCCLComm: RawRepresentable, Hashable, @unchecked Sendable {
    public var rawValue: OpaquePointer
    public init(rawValue: OpaquePointer) { self.rawValue = rawValue }
}

/// `ncclResult_t` values used here (nccl.h).
enum NCCLResult {
    static let inProgress: Int32 = 7
}

/// `ncclDataType_t` values used here (nccl.h).
public enum NCCLDataType: Int32, Sendable {
    case uint8 = 1, int32 = 2, int64 = 4, float32 = 7
}

/// The calls a rank makes to join a communicator and exchange its buffers' handles.
struct NCCLCommFunctions {
    let ncclGetUniqueId: @convention(c) (UnsafeMutableRawPointer?) -> Int32
    let ncclCommInitRank: UnsafeRawPointer   // takes ncclUniqueId by value: called through the C shim
    let ncclCommInitRankConfig: UnsafeRawPointer
    let ncclCommGetAsyncError: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?) -> Int32
    let ncclCommFinalize: @convention(c) (OpaquePointer?) -> Int32
    let ncclCommDestroy: @convention(c) (OpaquePointer?) -> Int32
    let ncclCommAbort: @convention(c) (OpaquePointer?) -> Int32
    let ncclCommCount: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?) -> Int32
    let ncclCommUserRank: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?) -> Int32
    let ncclAllGather: @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Int32, OpaquePointer?, OpaquePointer?) -> Int32

    init(_ library: DynamicLibrary) throws {
        ncclGetUniqueId = try library.function("ncclGetUniqueId")
        ncclCommInitRank = try library.function("ncclCommInitRank")
        ncclCommInitRankConfig = try library.function("ncclCommInitRankConfig")
        ncclCommGetAsyncError = try library.function("ncclCommGetAsyncError")
        ncclCommFinalize = try library.function("ncclCommFinalize")
        ncclCommDestroy = try library.function("ncclCommDestroy")
        ncclCommAbort = try library.function("ncclCommAbort")
        ncclCommCount = try library.function("ncclCommCount")
        ncclCommUserRank = try library.function("ncclCommUserRank")
        ncclAllGather = try library.function("ncclAllGather")
    }
}

extension NCCLLibrary {
    /// `ncclGetUniqueId`: rank 0 calls it once and hands the id to every rank.
    public func uniqueID() throws -> NCCLUniqueID {
        var bytes = [UInt8](repeating: 0, count: NCCLUniqueID.byteCount)
        try check(try comm().ncclGetUniqueId(&bytes), "ncclGetUniqueId")
        return try NCCLUniqueID(bytes: bytes)
    }

    /// `ncclCommInitRankConfig`, non-blocking: joins the communicator of `ranks` ranks as `rank`,
    /// waiting at most `timeout` for the others. A rank that never joins ends the wait with an
    /// error (the half-built communicator aborted) instead of a hang. Calls on the communicator
    /// then return before their work is done: `waitReady` bounds the wait for it.
    public func initRank(ranks: Int, id: NCCLUniqueID, rank: Int, timeout: Duration = .seconds(60)) throws -> NCCLComm {
        var handle: UnsafeMutableRawPointer?
        var value = id.shimValue
        var config = ep_shim_nccl_config(0)
        // NCCL takes both as 32-bit ints (a launcher's RANK / WORLD_SIZE may say anything).
        guard let count = Int32(exactly: ranks), count >= 1, let me = Int32(exactly: rank), me >= 0, me < count else {
            throw CUDAError.nccl(call: "ncclCommInitRankConfig", code: 4,
                                 name: "ncclInvalidArgument \"rank \(rank) of \(ranks) ranks: ranks must be in 1...\(Int32.max) and rank in 0..<ranks\"")
        }
        let result = ep_shim_nccl_comm_init_rank_config(try comm().ncclCommInitRankConfig, &handle, count, &value, me, &config)
        if result != NCCLResult.inProgress { try check(result, "ncclCommInitRankConfig") }
        guard let handle else { throw CUDAError.nccl(call: "ncclCommInitRankConfig", code: 3, name: "ncclInternalError \"no communicator\"") }
        let joined = NCCLComm(rawValue: OpaquePointer(handle))
        do {
            try waitReady(joined, timeout: timeout, call: "ncclCommInitRankConfig", waitingFor: "all \(ranks) ranks to join")
        } catch {
            try? abort(joined)
            throw error
        }
        return joined
    }

    /// Polls `ncclCommGetAsyncError` until the communicator's pending operation (init, window
    /// registration, an enqueued collective) is done; throws its error, or a timeout that names
    /// `what` was awaited. The caller aborts the communicator after a timeout.
    public func waitReady(_ comm: NCCLComm, timeout: Duration, call: String, waitingFor what: String) throws {
        var state: Int32 = 0
        let settled = try poll(every: .microseconds(200), for: timeout) {
            try check(try self.comm().ncclCommGetAsyncError(comm.rawValue, &state), "ncclCommGetAsyncError")
            return state != NCCLResult.inProgress
        }
        guard settled else {
            throw CUDAError.nccl(call: call, code: NCCLResult.inProgress, name: "ncclInProgress \"timed out after \(timeout) waiting for \(what)\"")
        }
        if state != 0 { throw CUDAError.nccl(call: call, code: state, name: errorName(state)) }
    }

    public func destroy(_ comm: NCCLComm) throws { try check(try self.comm().ncclCommDestroy(comm.rawValue), "ncclCommDestroy") }

    /// Ends a communicator without hanging on a rank that died: `ncclCommFinalize` (which waits
    /// for the others) bounded by `timeout`, then `ncclCommDestroy`; `ncclCommAbort` when the
    /// others do not answer in time. Throws the finalize error after aborting.
    public func close(_ comm: NCCLComm, timeout: Duration = .seconds(10)) throws {
        do {
            let result = try self.comm().ncclCommFinalize(comm.rawValue)
            if result != NCCLResult.inProgress { try check(result, "ncclCommFinalize") }
            try waitReady(comm, timeout: timeout, call: "ncclCommFinalize", waitingFor: "the other ranks to finalize")
        } catch {
            try? abort(comm)
            throw error
        }
        try destroy(comm)
    }
    public func abort(_ comm: NCCLComm) throws { try check(try self.comm().ncclCommAbort(comm.rawValue), "ncclCommAbort") }

    public func count(_ comm: NCCLComm) throws -> Int {
        var value: Int32 = 0
        try check(try self.comm().ncclCommCount(comm.rawValue, &value), "ncclCommCount")
        return Int(value)
    }

    public func userRank(_ comm: NCCLComm) throws -> Int {
        var value: Int32 = 0
        try check(try self.comm().ncclCommUserRank(comm.rawValue, &value), "ncclCommUserRank")
        return Int(value)
    }

    /// `ncclAllGather` of `count` elements per rank, device buffers, on `stream`.
    public func allGather(
        from source: DevicePointer, to destination: DevicePointer, count: Int, type: NCCLDataType, comm: NCCLComm,
        stream: CUDAStream
    ) throws {
        let result = try self.comm().ncclAllGather(
            UnsafeRawPointer(bitPattern: UInt(source.rawValue)), UnsafeMutableRawPointer(bitPattern: UInt(destination.rawValue)),
            count, type.rawValue, comm.rawValue, stream.rawValue)
        // A non-blocking communicator may still be enqueueing: `waitReady` finishes that.
        if result != NCCLResult.inProgress { try check(result, "ncclAllGather") }
    }
}

/// NCCL's host queries for where a registered window of a peer is mapped in this process
/// (NCCL 2.29+, `nccl_device/core.h`), optional symbols (NCCL 2.28 has neither):
/// `ncclResult_t ncclGetPeerDevicePointer(ncclWindow_t window, size_t offset, int peer, void** outPtr)`
/// takes a world rank and gives NULL for a peer that loads and stores cannot reach;
/// `ncclResult_t ncclGetLsaDevicePointer(ncclWindow_t window, size_t offset, int lsaRank, void** outPtr)`
/// takes a rank of the load/store-accessible (LSA) team and fails for one outside it.
struct NCCLPeerPointerFunctions {
    typealias Query = @convention(c) (OpaquePointer?, Int, Int32, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Int32
    let ncclGetPeerDevicePointer: Query?
    let ncclGetLsaDevicePointer: Query?

    init(_ library: DynamicLibrary) {
        ncclGetPeerDevicePointer = library.optionalFunction("ncclGetPeerDevicePointer")
        ncclGetLsaDevicePointer = library.optionalFunction("ncclGetLsaDevicePointer")
    }
}

extension NCCLLibrary {
    /// Whether this NCCL can say where a peer's window is mapped here (`peerPointer`).
    public var offersPeerPointers: Bool {
        peerPointerFunctions.ncclGetPeerDevicePointer != nil || peerPointerFunctions.ncclGetLsaDevicePointer != nil
    }

    /// The address in this process of byte `offset` of world rank `peer`'s part of `window`
    /// (registered on a communicator of `ranks` ranks), mapped by NCCL itself: nil when this
    /// NCCL has no peer-pointer query or loads and stores cannot reach `peer`.
    /// `ncclGetPeerDevicePointer` where present; otherwise `ncclGetLsaDevicePointer`, used only
    /// when the LSA team is the whole communicator (its rank `ranks - 1` exists), where LSA
    /// ranks are world ranks.
    public func peerPointer(_ window: NCCLWindow, offset: Int = 0, peer: Int, ranks: Int) throws -> DevicePointer? {
        var pointer: UnsafeMutableRawPointer?
        if let query = peerPointerFunctions.ncclGetPeerDevicePointer {
            try check(query(window.rawValue, offset, Int32(peer), &pointer), "ncclGetPeerDevicePointer")
        } else if let query = peerPointerFunctions.ncclGetLsaDevicePointer {
            var last: UnsafeMutableRawPointer?
            guard query(window.rawValue, offset, Int32(ranks - 1), &last) == 0, last != nil else { return nil }
            try check(query(window.rawValue, offset, Int32(peer), &pointer), "ncclGetLsaDevicePointer")
        } else {
            return nil
        }
        return pointer.map { DevicePointer(rawValue: UInt64(UInt(bitPattern: $0))) }
    }
}
