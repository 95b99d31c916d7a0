import Testing
@testable import ep_bench

/// `info --arch` takes an architecture's name; anything else reached NVRTC, and every kernel
/// "failed to compile" (status 1, NVRTC_ERROR_INVALID_OPTION) instead of a usage error.
@Suite("ep-bench info --arch")
struct InfoArchTests {
    @Test("not an architecture's name", arguments: ["", "sm_xx", "90", "sm_", "sm_90b", "compute90", "sm_90a --x", "sm_90/../x", "-1"])
    func refused(arch: String) throws {
        let refused = try #require(refusal(["info", "--arch", arch]))
        #expect(refused.status == usageStatus, "\(refused)")
        #expect(refused.message.contains("--arch \(arch)") && refused.message.contains("sm_<number>"), "\(refused)")
    }

    @Test("architectures' names", arguments: ["sm_90a", "sm_90", "sm_100f", "compute_90", "compute_90a", "sm_120"])
    func accepted(arch: String) throws {
        #expect(try parsed(["info", "--arch", arch], as: InfoCommand.self).arch == arch)
    }
}
