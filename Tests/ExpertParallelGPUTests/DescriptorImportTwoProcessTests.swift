import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation
import Testing

/// Two processes on one GPU share device memory as NCCL ranks do (PeerBuffers): each allocates
/// with `ncclMemAlloc`, exports it as a POSIX descriptor and hands it to the other through
/// `DescriptorExchange` (a Unix socket, `SCM_RIGHTS`, the peer's uid and pid checked); each
/// imports and maps the other's, and reads the bytes the other wrote. Then the parent writes into
/// the child's memory through its mapping and the child reads them in its own. No ptrace.
/// The parent starts the child: this test binary, filtered to `descriptorChild`, with
/// EP_DESCRIPTOR_CHILD naming the directory where the two leave their records and marks.
@Suite(.enabled(if: gpuTestsEnabled && sharedDevice != nil && (try? NCCLLibrary.shared()) != nil, "needs a GPU and NCCL (EP_GPU_TESTS=1)"))
struct DescriptorImportTwoProcessTests {
    static let words = 1 << 19   // 2 MiB of UInt32
    static let meeting = ProcessInfo.processInfo.environment["EP_DESCRIPTOR_CHILD"]

    /// Rank r's bytes: no two ranks', and no word the other's complement.
    static func pattern(rank: Int) -> [UInt32] {
        (0..<words).map { UInt32(truncatingIfNeeded: ($0 &* 2_654_435_761) ^ (rank &* 0x5bd1_e995) | 1) }
    }

    @Test(.enabled(if: meeting == nil, "the parent's side"))
    func aPeerProcesssAllocationIsImportedReadAndWritten() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("ep-descriptors-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let child = Process()
        // This very binary (argv[0] may be a bare name found on PATH).
        child.executableURL = URL(fileURLWithPath: try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        child.arguments = ["--testing-library", "swift-testing", "--filter", "descriptorChild"]
        child.environment = ProcessInfo.processInfo.environment.merging(["EP_DESCRIPTOR_CHILD": directory.path]) { _, new in new }
        let log = directory.appendingPathComponent("child.log")
        FileManager.default.createFile(atPath: log.path, contents: nil)
        let output = try FileHandle(forWritingTo: log)
        child.standardOutput = output
        child.standardError = output
        try child.run()
        defer { if child.isRunning { child.terminate() } }
        func childLog() -> String { (try? String(contentsOf: log, encoding: .utf8)) ?? "" }

        let side = try Side(rank: 0, directory: directory)
        let theirs = try side.meet(peer: 1) { child.isRunning }
        try side.check(theirs, holds: Self.pattern(rank: 1))
        // Into the child's memory through this mapping; the child reads it in its own.
        try side.driver.copy(Self.pattern(rank: 1).map { ~$0 }, to: theirs.pointer)
        try side.mark("written")
        let deadline = Date().addingTimeInterval(120)
        while child.isRunning && Date() < deadline { usleep(10_000) }
        #expect(!child.isRunning, "the child did not finish: \(childLog())")
        #expect(child.terminationStatus == 0, "the child failed: \(childLog())")
        #expect(side.marked("child-ok"), "the child did not see the parent's bytes: \(childLog())")
        try side.close(theirs)
    }

    /// The child's side (run only by the parent above).
    @Test(.enabled(if: meeting != nil, "started by aPeerProcesssAllocationIsImportedReadAndWritten"))
    func descriptorChild() throws {
        let side = try Side(rank: 1, directory: URL(fileURLWithPath: try #require(Self.meeting)))
        let theirs = try side.meet(peer: 0) { true }
        try side.check(theirs, holds: Self.pattern(rank: 0))
        try side.wait(for: "written") { true }
        let mine = try side.driver.read(UInt32.self, from: side.memory, count: Self.words)
        let expected = Self.pattern(rank: 1).map { ~$0 }
        #expect(mine == expected, "the parent's bytes, read in the child's own allocation")
        if mine == expected { try side.mark("child-ok") }
        try side.close(theirs)
    }

    /// One process's allocation, its exchange and the meeting directory.
    final class Side {
        let rank: Int
        let directory: URL
        let device: GPUDevice
        let driver: DriverLibrary
        let nccl: NCCLLibrary
        let memory: DevicePointer
        let exchange: DescriptorExchange

        init(rank: Int, directory: URL) throws {
            self.rank = rank
            self.directory = directory
            device = try #require(sharedDevice)
            try device.makeCurrent()
            driver = device.driver
            nccl = try NCCLLibrary.shared()
            memory = try nccl.memAlloc(byteCount: DescriptorImportTwoProcessTests.words * 4)
            try driver.copy(DescriptorImportTwoProcessTests.pattern(rank: rank), to: memory)
            exchange = try DescriptorExchange(rank: rank)
        }

        deinit { try? nccl.memFree(memory) }

        /// Publishes this side's record, waits for the peer's, exchanges the exported allocations
        /// and maps the peer's. `alive`: false when waiting is pointless (the peer exited).
        func meet(peer: Int, alive: () -> Bool) throws -> (pointer: DevicePointer, bytes: Int) {
            try mark("record-\(rank)", contents: exchange.record.map(String.init).joined(separator: " "))
            let words = try wait(for: "record-\(peer)", alive: alive).split(separator: " ").compactMap { Int64($0) }
            let exported = try driver.exportAllocation(memory)
            defer { Glibc.close(exported.fileDescriptor) }
            let received = try exchange.exchange([exported], with: [DescriptorExchange.Peer(rank: peer, record: words)], timeout: .seconds(60))
            let theirs = try #require(received[peer]?.first, "the peer's descriptor")
            defer { Glibc.close(theirs.fileDescriptor) }
            #expect(theirs.byteCount >= DescriptorImportTwoProcessTests.words * 4)
            let mapped = try driver.importAllocation(fileDescriptor: theirs.fileDescriptor, byteCount: theirs.byteCount, deviceOrdinal: device.ordinal)
            return (mapped, theirs.byteCount)
        }

        func check(_ theirs: (pointer: DevicePointer, bytes: Int), holds expected: [UInt32]) throws {
            let seen = try driver.read(UInt32.self, from: theirs.pointer, count: DescriptorImportTwoProcessTests.words)
            #expect(seen == expected, "rank \(rank) reads the peer's bytes through its mapping")
        }

        func close(_ theirs: (pointer: DevicePointer, bytes: Int)) throws {
            try driver.unmapImported(theirs.pointer, byteCount: theirs.bytes)
        }

        /// Writes a file atomically (a temporary name, then a rename), so the peer never reads half of it.
        func mark(_ name: String, contents: String = "") throws {
            let temporary = directory.appendingPathComponent(".\(name).\(rank)")
            try contents.write(to: temporary, atomically: false, encoding: .utf8)
            _ = rename(temporary.path, directory.appendingPathComponent(name).path)
        }

        func marked(_ name: String) -> Bool { FileManager.default.fileExists(atPath: directory.appendingPathComponent(name).path) }

        /// The contents of mark `name` once it exists (at most 60 s, and only while `alive`).
        @discardableResult
        func wait(for name: String, alive: () -> Bool) throws -> String {
            let deadline = Date().addingTimeInterval(60)
            while !marked(name) {
                guard alive(), Date() < deadline else { throw CUDAError.driver(call: "wait for \(name)", code: 1, name: "the peer never wrote it") }
                usleep(5_000)
            }
            return try String(contentsOf: directory.appendingPathComponent(name), encoding: .utf8)
        }
    }
}
