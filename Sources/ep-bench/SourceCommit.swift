import Foundation

/// The commit a result belongs to. SwiftPM offers no build-time hook without a plugin, so it is
/// read at run time: `$EP_COMMIT` when set (a binary carried to a machine without the checkout),
/// else `git rev-parse HEAD` in the checkout this binary was built from, when it is still there.
/// Neither: nil (null in the JSON). `modified`: tracked files differ from that commit.
struct SourceCommit: Sendable {
    var commit: String?
    var modified: Bool?
    /// Where the commit came from: "EP_COMMIT", or "git at run time in <folder>".
    var source: String?

    static func current(environment: [String: String] = ProcessInfo.processInfo.environment) -> SourceCommit {
        if let given = environment["EP_COMMIT"], !given.isEmpty {
            return SourceCommit(commit: given, modified: nil, source: "EP_COMMIT")
        }
        let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().path
        guard FileManager.default.fileExists(atPath: folder),
            let head = git(["rev-parse", "HEAD"], in: folder)?.trimmingCharacters(in: .whitespacesAndNewlines),
            head.count == 40
        else { return SourceCommit() }
        // --no-optional-locks: reading the status must not refresh (write) the checkout's index.
        let status = git(["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], in: folder)
        return SourceCommit(commit: head, modified: status.map { !$0.isEmpty }, source: "git at run time in \(folder)")
    }

    /// git's standard output, or nil when git is missing or fails.
    private static func git(_ arguments: [String], in folder: String) -> String? {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["git", "-C", folder] + arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        do { try process.run() } catch { return nil }
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { return nil }
        return String(decoding: data, as: UTF8.self)
    }
}
