import ExpertParallelCUDA
import Foundation

/// Switches read from the environment, so CI and the GPU machine decide what runs.
enum TestEnvironment {
    /// `EP_REQUIRE_NVRTC=1`: NVRTC tests run, and fail if NVRTC cannot be loaded (CI sets it).
    static let requiresNVRTC = ProcessInfo.processInfo.environment["EP_REQUIRE_NVRTC"] == "1"
    /// NVRTC tests run when required or when NVRTC is found.
    static let runsNVRTCTests = requiresNVRTC || NVRTCLibrary.isAvailable
    /// `EP_GPU_TESTS=1`: tests that need a GPU run.
    static let runsGPUTests = ProcessInfo.processInfo.environment["EP_GPU_TESTS"] == "1"
}

/// A fresh folder under the system's temporary directory, removed by `remove()`.
struct TemporaryDirectory {
    let path: String

    init() throws {
        path = FileManager.default.temporaryDirectory
            .appendingPathComponent("ep-kernel-cache-test-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}
