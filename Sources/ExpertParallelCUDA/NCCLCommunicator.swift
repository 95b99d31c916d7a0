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

/// `ncclDataType_t` values used here (nccl.h).
public enum NCCLDataType: Int32, Sendable {
    case uint8 = 1, int32 = 2, int64 = 4, float32 = 7
}

/// The calls a rank makes to join a communicator and exchange its buffers' handles.
struct NCCLCommFunctions {
    let ncclGetUniqueId: @convention(c) (UnsafeMutableRawPointer?) -> Int32
    let ncclCommInitRank: UnsafeRawPointer   // takes ncclUniqueId by value: called through the C shim
    let ncclCommDestroy: @convention(c) (OpaquePointer?) -> Int32
    let ncclCommAbort: @convention(c) (OpaquePointer?) -> Int32
    let ncclCommCount: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?) -> Int32
    let ncclCommUserRank: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?) -> Int32
    let ncclAllGather: @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Int32, OpaquePointer?, OpaquePointer?) -> Int32

    init(_ library: DynamicLibrary) throws {
        ncclGetUniqueId = try library.function("ncclGetUniqueId")
        ncclCommInitRank = try library.function("ncclCommInitRank")
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

    /// `ncclCommInitRank`: joins the communicator of `ranks` ranks as `rank` (blocks until all join).
    public func initRank(ranks: Int, id: NCCLUniqueID, rank: Int) throws -> NCCLComm {
        var handle: UnsafeMutableRawPointer?
        var value = id.shimValue
        let result = ep_shim_nccl_comm_init_rank(try comm().ncclCommInitRank, &handle, Int32(ranks), &value, Int32(rank))
        try check(result, "ncclCommInitRank")
        guard let handle else { throw CUDAError.nccl(call: "ncclCommInitRank", code: 3, name: "ncclInternalError \"no communicator\"") }
        return NCCLComm(rawValue: OpaquePointer(handle))
    }

    public func destroy(_ comm: NCCLComm) throws { try check(try self.comm().ncclCommDestroy(comm.rawValue), "ncclCommDestroy") }
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
        try check(
            try self.comm().ncclAllGather(
                UnsafeRawPointer(bitPattern: UInt(source.rawValue)), UnsafeMutableRawPointer(bitPattern: UInt(destination.rawValue)),
                count, type.rawValue, comm.rawValue, stream.rawValue),
            "ncclAllGather")
    }
}
