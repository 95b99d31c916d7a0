import ExpertParallel
import ExpertParallelCUDA

/// How an NCCL rank's shared buffers are allocated and reached by the other ranks.
public enum PeerSharing: String, Sendable, CaseIterable {
    /// `ncclMemAlloc`, registered as NCCL windows. Where every rank's NCCL answers host
    /// peer-pointer queries (2.29+: `ncclGetPeerDevicePointer`), the peers' windows are used
    /// where NCCL mapped them and no descriptor is exchanged. Otherwise each allocation is
    /// exported as a POSIX file descriptor, passed to the peers over a Unix domain socket
    /// (`SCM_RIGHTS`, `DescriptorExchange`: only to processes of this user that the all-gather
    /// named) and mapped. Either mapping keeps the memory of a rank that died alive (NCCL's until
    /// the communicator is aborted), so the survivors' late writes land harmlessly.
    case ncclWindows = "windows"
    /// `cuMemAlloc` and legacy CUDA IPC handles (no windows): for machines where neither NCCL's
    /// peer pointers nor passing descriptors between processes works.
    case cudaIPC = "ipc"
}

/// One rank's shared buffers and its mappings of every other rank's: the handles travel
/// through `ncclAllGather`, each wait bounded by `timeout` (a rank that never arrives makes
/// the constructor throw instead of hang).
final class PeerBuffers {
    let sharing: PeerSharing
    /// This rank's buffers, in the order of `sizes`.
    private(set) var local: [DevicePointer] = []
    /// Every rank's buffers as mapped here (this rank's own are `local`).
    private(set) var byRank: [[DevicePointer]] = []
    private let driver: DriverLibrary
    private let nccl: NCCLLibrary
    private let comm: NCCLComm
    private let timeout: Duration
    private var windows: [NCCLWindow] = []
    private var mapped: [(pointer: DevicePointer, bytes: Int)] = []
    private var opened: [DevicePointer] = []
    /// The peers' buffers are NCCL's own mappings of their windows (`ncclGetPeerDevicePointer`).
    private(set) var mappedByNCCL = false

    init(
        sizes: [Int], sharing: PeerSharing, device: GPUDevice, comm: NCCLComm, nccl: NCCLLibrary, rank: Int, ranks: Int,
        stream: CUDAStream, timeout: Duration
    ) throws(EPError) {
        self.sharing = sharing
        driver = device.driver
        self.nccl = nccl
        self.comm = comm
        self.timeout = timeout
        var exported: [ExportedAllocation] = []
        var done = false
        defer {
            for e in exported { DescriptorExchange.closeDescriptor(e.fileDescriptor) }
            if !done { release(collectively: false) }
        }
        let driver = device.driver
        for bytes in sizes {
            let p = try gpu { sharing == .ncclWindows ? try nccl.memAlloc(byteCount: bytes) : try driver.allocate(byteCount: bytes) }
            local.append(p)
            try gpu { try driver.fill(p, byte: 0, byteCount: bytes) }
        }
        try device.waitForLegacyStream()   // zero before any peer's kernel writes here
        switch sharing {
        case .ncclWindows:
            for (p, bytes) in zip(local, sizes) {
                windows.append(try gpu { try nccl.registerWindow(comm, p, byteCount: bytes, timeout: timeout) })
            }
            // Every rank must take the same way: NCCL's peer pointers only when all ranks have them.
            let queried = try gpu { try Self.peerPointers(nccl, windows: windows, local: local, rank: rank, ranks: ranks) }
            let votes = try exchange([queried == nil ? 0 : 1], stream: stream)
            if let queried, votes.allSatisfy({ $0 == 1 }) {
                byRank = queried
                mappedByNCCL = true
                break
            }
            // Descriptors over a Unix socket: the listener first, so it exists before the peers
            // learn its name from the all-gather. DescriptorExchangeTests run this exchange on the
            // CPU; the import of what it passes (two processes on one GPU) has not run on a GPU yet.
            let sockets = try gpu { try DescriptorExchange(rank: rank) }
            defer { sockets.close() }   // removes the socket's name whatever happens
            for p in local { exported.append(try gpu { try driver.exportAllocation(p) }) }
            let all = try exchange(sockets.record, stream: stream)
            let width = DescriptorExchange.recordCount
            var peers: [DescriptorExchange.Peer] = []
            for r in 0..<ranks where r != rank {
                peers.append(try gpu { try DescriptorExchange.Peer(rank: r, record: all[(r * width)..<((r + 1) * width)]) })
            }
            let received = try gpu { try sockets.exchange(exported, with: peers, timeout: timeout) }
            defer { for list in received.values { for e in list { DescriptorExchange.closeDescriptor(e.fileDescriptor) } } }
            for r in 0..<ranks {
                if r == rank { byRank.append(local); continue }
                var pointers: [DevicePointer] = []
                for (b, e) in (received[r] ?? []).enumerated() {
                    guard e.byteCount >= sizes[b] else {
                        throw EPError.backend("descriptor exchange: rank \(r) shared \(e.byteCount) bytes for buffer \(b), which needs \(sizes[b])")
                    }
                    let p = try gpu { try driver.importAllocation(fileDescriptor: e.fileDescriptor, byteCount: e.byteCount, deviceOrdinal: device.ordinal) }
                    mapped.append((p, e.byteCount))
                    pointers.append(p)
                }
                byRank.append(pointers)
            }
            // As before: a rank that failed to map its peers' buffers fails the others' construction too.
            _ = try exchange([0], stream: stream)
        case .cudaIPC:
            let words = IPCMemHandle.byteCount / 8
            var record: [Int64] = []
            for p in local {
                let handle = try gpu { try driver.ipcHandle(for: p) }.bytes
                record += (0..<words).map { w in handle[(w * 8)..<(w * 8 + 8)].reversed().reduce(Int64(0)) { $0 << 8 | Int64($1) } }
            }
            let all = try exchange(record, stream: stream)
            for r in 0..<ranks {
                if r == rank { byRank.append(local); continue }
                var pointers: [DevicePointer] = []
                for b in sizes.indices {
                    let start = r * record.count + b * words
                    let bytes = all[start..<(start + words)].flatMap { w in (0..<8).map { UInt8(truncatingIfNeeded: w >> (8 * $0)) } }
                    let p = try gpu { try driver.openIPCHandle(try IPCMemHandle(bytes: bytes)) }
                    opened.append(p)
                    pointers.append(p)
                }
                byRank.append(pointers)
            }
        }
        done = true
    }

    /// Every rank's buffers as NCCL mapped them into this process (`local` for this rank), or
    /// nil when this NCCL cannot say for some peer (older than 2.29, or a peer that loads and
    /// stores cannot reach). Not run yet: the GPU machines load NCCL 2.28, which has no query.
    private static func peerPointers(
        _ nccl: NCCLLibrary, windows: [NCCLWindow], local: [DevicePointer], rank: Int, ranks: Int
    ) throws -> [[DevicePointer]]? {
        guard nccl.offersPeerPointers else { return nil }
        var byRank: [[DevicePointer]] = []
        for r in 0..<ranks {
            if r == rank { byRank.append(local); continue }   // NCCL may answer another alias for this rank
            var pointers: [DevicePointer] = []
            for w in windows {
                guard let p = try nccl.peerPointer(w, peer: r, ranks: ranks) else { return nil }
                pointers.append(p)
            }
            byRank.append(pointers)
        }
        return byRank
    }

    /// `ncclAllGather` of `values` (the same count on every rank), waited for at most `timeout`.
    private func exchange(_ values: [Int64], stream: CUDAStream) throws(EPError) -> [Int64] {
        let (driver, nccl, comm, timeout) = (self.driver, self.nccl, self.comm, self.timeout)
        return try gpu {
            let ranks = try nccl.count(comm)
            let send = try driver.allocate(byteCount: values.count * 8)
            let receive = try driver.allocate(byteCount: values.count * 8 * ranks)
            let done = try driver.createEvent()
            // After a timeout NCCL's kernel may still run on these buffers (until the owner aborts
            // the communicator), and freeing them would wait for it: they are left allocated then.
            var abandoned = false
            defer {
                if !abandoned {
                    try? driver.destroy(done)
                    try? driver.free(send)
                    try? driver.free(receive)
                }
            }
            try values.withUnsafeBytes { bytes in
                try driver.copy(from: bytes.baseAddress!, to: send, byteCount: bytes.count, stream: stream)   // ordered before the all-gather
            }
            try nccl.allGather(from: send, to: receive, count: values.count, type: .int64, comm: comm, stream: stream)
            do {
                try nccl.waitReady(comm, timeout: timeout, call: "ncclAllGather", waitingFor: "the other ranks' buffer handles")
            } catch {
                abandoned = true
                throw error
            }
            try driver.record(done, on: stream)
            guard try poll(every: .microseconds(100), for: timeout, until: { try driver.isComplete(done) }) else {
                abandoned = true
                throw EPError.lowerLayer(.callFailed(
                    .nccl, call: "ncclAllGather", code: nil,
                    name: "the other ranks did not answer the exchange of buffer handles within \(timeout) (abort the communicator)"))
            }
            return try driver.read(Int64.self, from: receive, count: values.count * ranks)
        }
    }

    /// Unmaps the peers' buffers and frees this rank's. `collectively`: every rank is alive and
    /// releasing too, so the (collective) window deregistration may run; otherwise it is left to
    /// `ncclCommAbort`, which the owner of a communicator with a dead rank must call.
    /// Runs once; later calls (and `deinit`) do nothing.
    func release(collectively: Bool) {
        guard !released else { return }
        released = true
        for (p, bytes) in mapped { try? driver.unmapImported(p, byteCount: bytes) }
        for p in opened { try? driver.closeIPCHandle(p) }
        if collectively {
            // The first failure leaves the rest to ncclCommAbort (NCCL may still use the memory).
            for w in windows {
                do {
                    try nccl.deregisterWindow(comm, w)
                    try nccl.waitReady(comm, timeout: timeout, call: "ncclCommWindowDeregister", waitingFor: "every rank to deregister")
                } catch {
                    return
                }
            }
        } else if !windows.isEmpty {
            return   // registered memory stays until the owner aborts the communicator
        }
        Self.free(local, sharing: sharing, driver: driver, nccl: nccl)
    }

    private var released = false

    deinit { release(collectively: false) }

    private static func free(_ pointers: [DevicePointer], sharing: PeerSharing, driver: DriverLibrary, nccl: NCCLLibrary) {
        for p in pointers {
            if sharing == .ncclWindows { try? nccl.memFree(p) } else { try? driver.free(p) }
        }
    }
}
