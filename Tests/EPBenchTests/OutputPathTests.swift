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

    /// Every command taking an output path refuses each of `paths` as a usage error naming its
    /// option, the path and why.
    static func expectRefused(_ paths: [(path: String, why: String)], input: String) {
        for (path, why) in paths {
            for (arguments, option) in commands(path, input: input) {
                guard let refused = refusal(arguments) else {
                    Issue.record("accepted: \(arguments)")
                    continue
                }
                #expect(refused.status == usageStatus, "\(refused)")
                #expect(refused.message.contains("\(option) \(path)") && refused.message.contains(why), "\(refused)")
            }
        }
    }

    /// Each output option with `path`: run's --json and --plot, and plot's --out.
    static func commands(_ path: String, input: String) -> [(arguments: [String], option: String)] {
        [(quick + ["--json", path], "--json"), (quick + ["--plot", path], "--plot"), (["plot", "--json", input, "--out", path], "--out")]
    }

    /// A path the write at the end could not create or replace was let through: Foundation wrote
    /// "new/" as the file "new", and a link to nowhere, a loop of links or a name longer than the
    /// file system takes failed after the whole run (status 1). Each is refused before anything
    /// runs, naming the option, the path and why (a file as a folder was "does not exist").
    @Test("an output path that cannot be written")
    func unwritable() throws {
        let folder = try TemporaryFolder()
        let input = try folder.file("engine.json", "[]"), file = try folder.file("file.txt", "kept")
        let files = FileManager.default
        try files.createSymbolicLink(atPath: "\(folder.path)/dangling", withDestinationPath: "\(folder.path)/none/out.json")
        try files.createSymbolicLink(atPath: "\(folder.path)/loop", withDestinationPath: "\(folder.path)/loop")
        let unwritable: [(path: String, why: String)] = [
            ("\(folder.path)/new/", "ends in /"),
            ("\(file)/", "ends in /"),
            ("\(file)/out.json", "\(file) is not a folder"),
            ("\(file)/a/out.json", "\(file) is not a folder"),
            ("\(folder.path)/none/out.json", "the folder \(folder.path)/none does not exist"),
            (folder.path, "is a folder"),
            ("\(folder.path)/dangling", "links to \(folder.path)/none/out.json"),
            ("\(folder.path)/loop", "symbolic links"),
            ("\(folder.path)/\(String(repeating: "n", count: 300)).json", "too long"),
        ]
        Self.expectRefused(unwritable, input: input)
        #expect(!files.fileExists(atPath: "\(folder.path)/new") && !files.fileExists(atPath: "\(folder.path)/none"))
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "kept")
    }

    /// A path that is there but is no regular file, or a file this process cannot open for
    /// writing, was let through: a FIFO held the write at the end until something read it (or
    /// forever), a socket or a device failed it or took it, and root, whom the permission check
    /// lets write anything, could not write a file of /proc (status 1, after the whole run). Each
    /// is refused before anything runs, naming the option, the path and what it is; the paths are
    /// left as they were.
    @Test("an output path that is no regular file, or that cannot be opened for writing")
    func notAWritableFile() throws {
        let folder = try TemporaryFolder()
        let input = try folder.file("engine.json", "[]"), readOnly = try folder.file("read-only.json", "kept")
        let fifo = "\(folder.path)/fifo", socketPath = "\(folder.path)/socket"
        try #require(mkfifo(fifo, 0o600) == 0)
        try FileManager.default.createSymbolicLink(atPath: "\(folder.path)/to-fifo", withDestinationPath: fifo)
        let socket = try Self.listeningSocket(socketPath)
        defer { close(socket) }
        try #require(chmod(readOnly, 0o444) == 0)
        var unwritable: [(path: String, why: String)] = [
            (fifo, "is a FIFO (named pipe), not a regular file"),
            ("\(folder.path)/to-fifo", "is a FIFO (named pipe), not a regular file"),
            (socketPath, "is a socket, not a regular file"),
            ("/dev/full", "is a character device, not a regular file"),
            ("/proc/version", "the file exists and is not writable"),
        ]
        // Root may write a file that is read-only to others, and the write at the end does.
        if geteuid() != 0 { unwritable.append((readOnly, "the file exists and is not writable")) }
        Self.expectRefused(unwritable, input: input)
        var info = stat()
        #expect(stat(fifo, &info) == 0 && info.st_mode & S_IFMT == S_IFIFO)
        #expect(try String(contentsOfFile: readOnly, encoding: .utf8) == "kept")
    }

    /// A Unix socket bound at `path`, listening (its descriptor, for the caller to close).
    static func listeningSocket(_ path: String) throws -> Int32 {
        let descriptor = Foundation.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        try #require(descriptor >= 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        try #require(bytes.count < MemoryLayout.size(ofValue: address.sun_path))
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(bound == 0 && listen(descriptor, 1) == 0)
        return descriptor
    }

    /// What can be written still is, and the check leaves it as it was: a new file, an existing
    /// one (not truncated), a link to a new file in an existing folder, /dev/null, and a pipe this
    /// process holds open (as /dev/stdout into `| jq`, or bash's `--json >(jq .)`, /dev/fd/63).
    @Test("an output path that can be written")
    func writable() throws {
        let folder = try TemporaryFolder()
        let input = try folder.file("engine.json", "[]"), old = try folder.file("old.json", "kept")
        try FileManager.default.createSymbolicLink(atPath: "\(folder.path)/link", withDestinationPath: "\(folder.path)/target.json")
        var ends: [Int32] = [-1, -1]
        try #require(pipe(&ends) == 0)
        defer { close(ends[0]); close(ends[1]) }
        for path in [try folder.file("new.json"), old, "\(folder.path)/link", "/dev/null", "/dev/fd/\(ends[1])"] {
            for (arguments, _) in Self.commands(path, input: input) {
                #expect(refusal(arguments) == nil, "\(arguments)")
            }
        }
        #expect(try String(contentsOfFile: old, encoding: .utf8) == "kept")
        #expect(!FileManager.default.fileExists(atPath: "\(folder.path)/new.json"))
        #expect(!FileManager.default.fileExists(atPath: "\(folder.path)/target.json"))
    }
}
