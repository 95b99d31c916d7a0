import Foundation
import Testing

/// Two NCCL ranks, one GPU each, where one fails on purpose (ep-bench's failure drills): the
/// other finishes within the timeout and reports it. Needs 2 GPUs and NCCL: EP_NCCL_TESTS=1,
/// with `ep-bench` on PATH (or at EP_BENCH).
@Suite(.enabled(if: ProcessInfo.processInfo.environment["EP_NCCL_TESTS"] == "1", "needs 2 GPUs and NCCL: set EP_NCCL_TESTS=1"), .serialized)
struct NCCLDrillTests {
    /// Runs the drill with a 2 s timeout; ep-bench itself checks every survivor's report.
    func drill(_ name: String) throws -> (status: Int32, output: String, seconds: Double) {
        let environment = ProcessInfo.processInfo.environment
        let bench = environment["EP_BENCH"]
            ?? (environment["PATH"] ?? "").split(separator: ":").map { "\($0)/ep-bench" }.first { FileManager.default.isExecutableFile(atPath: $0) }
        let executable = try #require(bench, "ep-bench not found on PATH or at EP_BENCH")
        let process = Process()
        let pipe = Pipe()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = ["run", "--transport", "nccl", "--ranks", "2", "--drill", name, "--drill-rank", "1", "--timeout-ms", "2000"]
        process.standardOutput = pipe
        process.standardError = pipe
        let start = Date()
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return (process.terminationStatus, output, Date().timeIntervalSince(start))
    }

    @Test(.timeLimit(.minutes(1)), arguments: ["dies", "never-joins"])
    func theSurvivorReportsTheFailedRankInTime(_ name: String) throws {
        let result = try drill(name)
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("drill \(name): rank 1 failed"), "\(result.output)")
        #expect(result.output.contains("rank 0:"), "\(result.output)")
        // Process start, CUDA and NCCL set-up, then at most one 2 s timeout per wait.
        #expect(result.seconds < 30, "took \(result.seconds) s")
    }
}
