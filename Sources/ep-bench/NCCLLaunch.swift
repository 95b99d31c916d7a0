import ExpertParallelCUDA
import Foundation

/// Starts `ranks` copies of this program, one per GPU, with the NCCL id in their environment, and
/// returns what each printed. NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
enum NCCLLauncher {
    static func spawn(ranks: Int, id: NCCLUniqueID, arguments: [String]) throws -> [(status: Int32, output: String)] {
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var processes: [(Process, Pipe)] = []
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
        return processes.map { process, pipe in
            let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            return (process.terminationStatus, output)
        }
    }
}
