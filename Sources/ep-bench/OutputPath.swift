import ArgumentParser
import Foundation

/// The check of an output file option (`run --json`, `run --plot`, `plot --out`) before anything
/// runs: the file the run writes at its end must be one it can create or replace. Nothing is
/// created, truncated or changed here: an existing file (links followed) must be writable and no
/// folder; a new one needs an existing folder this process may write in, and a name the file
/// system takes. (Root passes the permission checks: what root may not write, such as a file of
/// /proc, still fails at the end, status 1.)
enum OutputPath {
    /// A usage error naming `option` and `path` unless a write to `path` can succeed.
    static func check(_ path: String, option: String) throws {
        guard !path.isEmpty else { throw ValidationError("\(option): the path is empty") }
        if let problem = problem(path) { throw ValidationError("\(option) \(path)\(problem)") }
    }

    /// Why `path` cannot be written (what follows the option and the path), or nil.
    /// `links`: symbolic links followed so far (a link that leads nowhere is followed to its target).
    private static func problem(_ path: String, links: Int = 0) -> String? {
        var info = stat()
        if stat(path, &info) == 0 {
            if info.st_mode & S_IFMT == S_IFDIR { return " is a folder, not a file" }
            guard access(path, W_OK) == 0 else {
                return ": the file exists and is not writable (\(String(cString: strerror(errno))))"
            }
            return nil
        }
        let error = errno
        // Foundation would write "out/" as the file "out": a path that names a folder is refused.
        if path.hasSuffix("/") { return ": ends in /, so it names a folder, not a file" }
        switch error {
        case ENOENT:
            if let target = danglingTarget(path) {
                guard links < 40 else { return ": \(String(cString: strerror(ELOOP)))" }
                return problem(target, links: links + 1).map { ": it links to \(target), which cannot be written (\(target)\($0))" }
            }
            let folder = parent(path)
            var folderInfo = stat()
            guard stat(folder, &folderInfo) == 0 else { return ": the folder \(folder) does not exist" }
            guard folderInfo.st_mode & S_IFMT == S_IFDIR else { return ": \(folder) is not a folder" }
            guard access(folder, W_OK | X_OK) == 0 else {
                return ": the folder \(folder) is not writable (\(String(cString: strerror(errno))))"
            }
            return nil
        case ENOTDIR:
            // Some folder on the way is a file: name the nearest one that exists.
            var folder = parent(path)
            while stat(folder, &info) != 0, folder != parent(folder) { folder = parent(folder) }
            return ": \(folder) is not a folder"
        default:
            return ": \(String(cString: strerror(error)))"
        }
    }

    /// The target of `path` where it is a symbolic link to nothing (relative to the link's folder).
    private static func danglingTarget(_ path: String) -> String? {
        var info = stat()
        guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFLNK,
              let target = try? FileManager.default.destinationOfSymbolicLink(atPath: path) else { return nil }
        return target.hasPrefix("/") ? target : "\(parent(path))/\(target)"
    }

    /// The folder `path` is in, as written ("." for a bare name, "/" for a name at the root).
    private static func parent(_ path: String) -> String {
        let trimmed = path.hasSuffix("/") && path.count > 1 ? String(path.dropLast()) : path
        guard let slash = trimmed.lastIndex(of: "/") else { return "." }
        return slash == trimmed.startIndex ? "/" : String(trimmed[..<slash])
    }
}
