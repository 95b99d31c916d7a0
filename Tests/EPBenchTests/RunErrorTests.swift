import Foundation
import Testing

/// A usage error that a subcommand's `run()` throws (an input it cannot read as its format, the
/// GPU options once `--backend auto` found no GPU) was printed with the root command's usage,
/// "Usage: ep-bench <subcommand>", as if the subcommand had not been named. It is printed as the
/// same subcommand's `validate()` errors are: the error, then that subcommand's usage. These run
/// the ep-bench executable, built beside the tests, since what is printed is decided in its main.
@Suite("ep-bench: errors from a subcommand's run")
struct RunErrorTests {
    /// The ep-bench executable beside the test bundle (nil where it was not built there).
    static let executable: URL? = {
        let bundles = [Bundle.main.executableURL] + Bundle.allBundles.map { Optional($0.bundleURL) }
        return bundles.compactMap { $0?.deletingLastPathComponent().appendingPathComponent("ep-bench") }
            .first { FileManager.default.isExecutableFile(atPath: $0.path) }
    }()

    /// ep-bench's exit status and standard error for `arguments`.
    static func launch(_ arguments: [String]) throws -> (status: Int32, errors: String) {
        let executable: URL = try #require(Self.executable, "ep-bench is not built beside the tests")
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return (process.terminationStatus, text)
    }

    /// What follows the first line (the error): the usage lines.
    static func usage(_ text: String) -> [Substring] { Array(text.split(separator: "\n").dropFirst()) }

    @Test("plot: a --json input that run() finds is not of its format or has nothing to plot")
    func plotInput() throws {
        let folder = try TemporaryFolder()
        let out = "\(folder.path)/p.svg"
        // The usage a validate() error of plot prints (a missing input, checked before run()).
        let refused = try Self.launch(["plot", "--json", "\(folder.path)/none.json", "--out", out])
        #expect(refused.status == usageStatus && refused.errors.hasPrefix("Error: --json \(folder.path)/none.json"), "\(refused)")
        #expect(Self.usage(refused.errors).first?.hasPrefix("Usage: ep-bench plot ") == true, "\(refused.errors)")
        for (text, message) in [("nope", "is not an ep-bench --json file"), ("[]", "nothing to plot")] {
            let json = try folder.file("engine.json", text)
            let failed = try Self.launch(["plot", "--json", json, "--out", out])
            #expect(failed.status == usageStatus, "\(failed)")
            #expect(failed.errors.hasPrefix("Error: ") && failed.errors.split(separator: "\n").first?.contains(message) == true, "\(failed.errors)")
            #expect(!failed.errors.contains("<subcommand>"), "\(failed.errors)")
            #expect(Self.usage(failed.errors) == Self.usage(refused.errors), "\(failed.errors)")
        }
        #expect(!FileManager.default.fileExists(atPath: out))
    }
}
