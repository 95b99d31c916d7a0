import ExpertParallelCUDA
import Foundation

/// Starts `ranks` copies of this program, one per GPU, with the NCCL id in their environment, and
/// returns what each printed. NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
enum NCCLLauncher {
    static func spawn(ranks: Int, id: NCCLUniqueID, arguments: [String]) throws -> [(status: Int32, output: String)] {
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var processes: [(Process, Pipe)] = []
        var started = false
        defer { if !started { for (process, _) in processes where process.isRunning { process.terminate() } } }
        for rank in 0..<ranks {
            let process = Process()
            let pipe = Pipe()
            process.executableURL = executable
            process.arguments = arguments
            var environment = ProcessInfo.processInfo.environment
            environment["EP_NCCL_RANK"] = "\(rank)"
            environment["EP_NCCL_WORLD"] = "\(ranks)"
            environment["EP_NCCL_ID"] = id.hex
            environment["NCCL_NVLS_ENABLE"] = "0"
            process.environment = environment
            process.standardOutput = pipe
            process.standardError = FileHandle.standardError
            try process.run()
            processes.append((process, pipe))
        }
        started = true
        // Every rank's output is drained at once: a rank that fills its pipe while the launcher
        // reads another's would stall, and its peers would time out waiting for it.
        let outputs = OutputBox(count: ranks)
        let drained = DispatchGroup()
        for (rank, (_, pipe)) in processes.enumerated() {
            drained.enter()
            Thread {
                outputs.set(rank, pipe.fileHandleForReading.readDataToEndOfFile())
                drained.leave()
            }.start()
        }
        drained.wait()
        return processes.enumerated().map { rank, entry in
            entry.0.waitUntilExit()
            return (entry.0.terminationStatus, String(decoding: outputs.get(rank), as: UTF8.self))
        }
    }
}

/// Each rank's collected output, filled by one reader thread per rank.
private final class OutputBox: @unchecked Sendable {
    private let lock = NSLock()
    private var data: [Data]
    init(count: Int) { data = Array(repeating: Data(), count: count) }
    func set(_ rank: Int, _ value: Data) { lock.withLock { data[rank] = value } }
    func get(_ rank: Int) -> Data { lock.withLock { data[rank] } }
}
