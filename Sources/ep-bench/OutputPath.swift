import ArgumentParser
import Foundation

/// The check of an output file option (`run --json`, `run --plot`, `plot --out`) before anything
/// runs: the file the run writes at its end must be one it can create or replace. Nothing is
/// created, truncated or changed here: an existing file (links followed) must be a regular file
/// that opens for writing and takes a write of 0 bytes, /dev/null, or a pipe or device this
/// process holds open; a new one needs an existing folder this process may write in, and a name
/// the file system takes. (Root passes the permission check of a folder: a new file that root may
/// not create, such as one in /proc, still fails at the end, status 1.)
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
            let type = info.st_mode & S_IFMT
            if type == S_IFDIR { return " is a folder, not a file" }
            if type != S_IFREG {
                // A FIFO would hold the write until something reads it; a socket or a device fails
                // it or keeps what it likes. /dev/null, which keeps nothing, is taken, and so is
                // what this process holds open already (its standard output as /dev/stdout, the
                // pipe of bash's `--json >(jq .)` as /dev/fd/63): the write goes where the caller
                // pointed it.
                var null = stat()
                if stat("/dev/null", &null) == 0, info.st_dev == null.st_dev, info.st_ino == null.st_ino { return nil }
                if heldOpen(info) { return nil }
                return " is \(kind(type)), not a regular file"
            }
            return unwritable(path).map { ": the file exists and is not writable (\($0))" }
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

    /// Why the regular file `path` cannot be written (strerror's words), or nil: it is opened for
    /// writing, neither created nor truncated, and written 0 bytes, which changes nothing in a
    /// regular file but fails where the file system takes no write (a file of /proc, which opens
    /// for root). Root passes access(), so the open, not a permission check, answers.
    private static func unwritable(_ path: String) -> String? {
        let descriptor = open(path, O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
        guard descriptor >= 0 else { return String(cString: strerror(errno)) }
        defer { close(descriptor) }
        var nothing: UInt8 = 0
        guard write(descriptor, &nothing, 0) >= 0 else { return String(cString: strerror(errno)) }
        return nil
    }

    /// Whether one of this process's open descriptors is the file `info` describes.
    private static func heldOpen(_ info: stat) -> Bool {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") else { return false }
        return names.contains { name in
            var held = stat()
            guard let descriptor = Int32(name), fstat(descriptor, &held) == 0 else { return false }
            return held.st_dev == info.st_dev && held.st_ino == info.st_ino
        }
    }

    /// What a file of type `type` (st_mode & S_IFMT) is, as the error names it.
    private static func kind(_ type: mode_t) -> String {
        switch type {
        case S_IFIFO: "a FIFO (named pipe)"
        case S_IFSOCK: "a socket"
        case S_IFCHR: "a character device"
        case S_IFBLK: "a block device"
        default: "a file of type \(String(type, radix: 8))"
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
