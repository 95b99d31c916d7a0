import ExpertParallel
import ExpertParallelCUDA

extension GPUDevice {
    /// Waits for CUDA's legacy default stream: plain memsets and copies run there (a copy from
    /// pageable memory may return before its DMA lands), and the groups' streams, created
    /// non-blocking, do not wait for it. Control path.
    func waitForLegacyStream() throws(EPError) {
        try gpu { try driver.synchronize(CUDAStream(rawValue: nil)) }
    }

    /// `byteCount` bytes of device memory, zero once this returns (so a kernel on any stream sees
    /// zeros); freed again if zeroing fails.
    func allocateZeroed(byteCount: Int) throws(EPError) -> DevicePointer {
        let pointer = try gpu { try driver.allocate(byteCount: byteCount) }
        do {
            try gpu { try driver.fill(pointer, byte: 0, byteCount: byteCount) }
            try waitForLegacyStream()
        } catch {
            try? driver.free(pointer)
            throw error
        }
        return pointer
    }
}
