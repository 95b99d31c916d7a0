import Foundation

/// Whether two paths name one file that a write to one would overwrite the other's content in:
/// where either exists, both must and be the same regular file (links followed, so a symbolic or
/// hard link to it is the same; not /dev/null, which anything may share); where neither does, the
/// same place (their folders' links resolved).
func sameFile(_ a: String, _ b: String) -> Bool {
    var first = stat(), second = stat()
    let firstExists = stat(a, &first) == 0, secondExists = stat(b, &second) == 0
    if firstExists || secondExists {
        return firstExists && secondExists && first.st_dev == second.st_dev && first.st_ino == second.st_ino
            && first.st_mode & S_IFMT == S_IFREG
    }
    return place(a) == place(b)
}

/// Where a file that does not exist yet would be: its folder with links resolved, then its name.
private func place(_ path: String) -> String {
    let url = URL(fileURLWithPath: path).standardizedFileURL
    return url.deletingLastPathComponent().resolvingSymlinksInPath().appendingPathComponent(url.lastPathComponent).path
}
