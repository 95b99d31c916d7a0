import ArgumentParser
import Foundation

/// `ep-bench plot`: the plot `run --plot` writes, drawn from a saved `--json` file, optionally
/// with the plain-PyTorch baseline of `python -m expert_parallel.bench --json`.
struct PlotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plot",
        abstract: "Write an SVG of per-rank GB/s against tokens per rank from an ep-bench --json file (and the Python bench's baseline).",
        discussion: exitStatusText)

    @Option(help: "The results of ep-bench run --json: this library's dispatch and combine, and their floors.")
    var json: String

    @Option(help: "The --json of python -m expert_parallel.bench: its plain-tensor baseline per call (µs), drawn at the bytes of this library's entry of the same case, ranks and tokens.")
    var baseline: String?

    @Option(help: "The SVG to write. Checked before anything is read, like run's --json.")
    var out: String

    func validate() throws {
        try OutputPath.check(out, option: "--out")
        let inputs = [(json, "--json")] + (baseline.map { [($0, "--baseline")] } ?? [])
        for (path, option) in inputs {
            try Self.checkReadable(path, option: option)
            if sameFile(out, path) {
                throw ValidationError("--out \(out) is the \(option) input: the plot would overwrite it; give another path")
            }
        }
    }

    /// An input must be a file this process may read (a folder or an empty path is named as such).
    static func checkReadable(_ path: String, option: String) throws {
        guard !path.isEmpty else { throw ValidationError("\(option): the path is empty") }
        var isFolder: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isFolder) else {
            throw ValidationError("\(option) \(path): cannot be read (no such file)")
        }
        if isFolder.boolValue { throw ValidationError("\(option) \(path) is a folder, not a file") }
        guard access(path, R_OK) == 0 else {
            throw ValidationError("\(option) \(path): cannot be read (\(String(cString: strerror(errno))))")
        }
    }

    func run() throws {
        let engine = try PlotEntry.decode(Self.read(json, option: "--json"), from: "--json \(json)")
        let rows = try baseline.map { try BaselineRow.decode(Self.read($0, option: "--baseline"), from: "--baseline \($0)") }
        let svg = try Plot(engine: engine, baseline: rows).svg()
        do {
            try Data(svg.utf8).write(to: URL(fileURLWithPath: out))
        } catch {
            throw RunFailure("--out \(out): could not write the plot (\(error.localizedDescription))")
        }
        print("wrote \(out)")
    }

    /// An input that cannot be read is a bad command line (status 64), named by its option.
    static func read(_ path: String, option: String) throws -> Data {
        do {
            return try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw ValidationError("\(option) \(path): cannot be read (\((error as NSError).localizedFailureReason ?? error.localizedDescription))")
        }
    }
}
