import CExpertParallelShim
import ExpertParallelCUDA
import Foundation
import Testing

/// How NCCL ranks receive a peer's exported allocation: by taking its file descriptor
/// (`pidfd_getfd`), and the non-blocking `ncclConfig_t` prefix handed to NCCL.
struct FileDescriptorTakingTests {
    /// A descriptor taken from this very process refers to the same pipe: bytes written through
    /// it come out of the pipe's other end. (Where the kernel or a seccomp policy forbids
    /// `pidfd_getfd`, the error must name the call instead.)
    @Test func aTakenDescriptorIsTheSameOpenFile() throws {
        try FileDescriptorTaking.allowTaking()
        let pipe = Pipe()
        let original = pipe.fileHandleForWriting.fileDescriptor
        let taken: Int32
        do {
            taken = try FileDescriptorTaking.take(original, from: FileDescriptorTaking.processID)
        } catch let error as CUDAError {
            #expect("\(error)".contains("pidfd_getfd"))
            return
        }
        #expect(taken != original)
        let message = Array("through the taken descriptor".utf8)
        #expect(message.withUnsafeBytes { write(taken, $0.baseAddress, $0.count) } == message.count)
        FileDescriptorTaking.close(taken)
        try pipe.fileHandleForWriting.close()
        #expect(Array(pipe.fileHandleForReading.readDataToEndOfFile()) == message)
    }

    @Test func takingADescriptorThatIsNotOpenNamesTheCall() {
        #expect {
            _ = try FileDescriptorTaking.take(1_000_000, from: FileDescriptorTaking.processID)
        } throws: { "\($0)".contains("pidfd_getfd(process \(FileDescriptorTaking.processID), descriptor 1000000)") }
    }

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
