import Foundation
import Testing
@testable import ep_bench

/// Output paths are checked before anything runs: two outputs of one run that are the same file,
/// an output that is one of the plot's inputs (it would be overwritten with the SVG), and inputs
/// that are empty paths or folders are usage errors naming the options and the path.
@Suite("ep-bench: output and input paths")
struct OutputPathTests {
    static let quick = ["--backend", "cpu", "--case", "ll-1", "--iterations", "1", "--warmup", "0"]

    @Test("run: --json and --plot the same file")
    func runSameFile() throws {
        let folder = try TemporaryFolder()
        try FileManager.default.createSymbolicLink(atPath: "\(folder.path)/link", withDestinationPath: folder.path)
        let json = try folder.file("out.json")
        for plot in [json, "\(folder.path)/./out.json", "\(folder.path)/link/out.json"] {
            let refused = try #require(refusal(Self.quick + ["--json", json, "--plot", plot]), "\(plot)")
            #expect(refused.status == usageStatus, "\(refused)")
            #expect(refused.message.contains("--plot \(plot)") && refused.message.contains("--json"), "\(refused)")
        }
        // An existing file, named through a link to it.
        _ = try folder.file("old.json", "[]")
        try FileManager.default.createSymbolicLink(atPath: "\(folder.path)/old.svg", withDestinationPath: "\(folder.path)/old.json")
        #expect(refusal(Self.quick + ["--json", "\(folder.path)/old.json", "--plot", "\(folder.path)/old.svg"]) != nil)
        // Different files are fine, and so is a device that keeps nothing.
        #expect(refusal(Self.quick + ["--json", json, "--plot", try folder.file("out.svg")]) == nil)
        #expect(refusal(Self.quick + ["--json", "/dev/null", "--plot", "/dev/null"]) == nil)
    }

    @Test("plot: --out is the --json or --baseline input")
    func plotOverwritesItsInput() throws {
        let folder = try TemporaryFolder()
        let json = try folder.file("engine.json", "[]"), baseline = try folder.file("py.json", "[]")
        try FileManager.default.createSymbolicLink(atPath: "\(folder.path)/link.svg", withDestinationPath: json)
        for (arguments, option) in [
            (["plot", "--json", json, "--out", json], "--json"),
            (["plot", "--json", json, "--out", "\(folder.path)/link.svg"], "--json"),
            (["plot", "--json", json, "--baseline", baseline, "--out", baseline], "--baseline"),
        ] {
            let refused = try #require(refusal(arguments), "\(arguments)")
            #expect(refused.status == usageStatus, "\(refused)")
            #expect(refused.message.contains("--out \(arguments.last!)") && refused.message.contains(option), "\(refused)")
        }
        #expect(refusal(["plot", "--json", json, "--baseline", baseline, "--out", try folder.file("p.svg")]) == nil)
    }

    @Test("plot: an input that is an empty path or a folder")
    func plotInputs() throws {
        let folder = try TemporaryFolder()
        let json = try folder.file("engine.json", "[]"), out = try folder.file("p.svg")
        for (arguments, expected) in [
            (["plot", "--json", "", "--out", out], "--json: the path is empty"),
            (["plot", "--json", folder.path, "--out", out], "--json \(folder.path) is a folder, not a file"),
            (["plot", "--json", json, "--baseline", "", "--out", out], "--baseline: the path is empty"),
            (["plot", "--json", json, "--baseline", folder.path, "--out", out], "--baseline \(folder.path) is a folder, not a file"),
            (["plot", "--json", "\(folder.path)/none.json", "--out", out], "--json \(folder.path)/none.json: cannot be read"),
        ] {
            let refused = try #require(refusal(arguments), "\(arguments)")
            #expect(refused.status == usageStatus && refused.message.contains(expected), "\(refused)")
        }
    }
}
