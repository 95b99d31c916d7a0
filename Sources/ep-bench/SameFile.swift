import Foundation

/// Whether two paths name one file: where either exists, both must and be the same file (links
/// followed, so a symbolic or hard link to it is the same); where neither does, the same place
/// (their folders' links resolved). Output options that are one file would write over each other.
func sameFile(_ a: String, _ b: String) -> Bool {
    var first = stat(), second = stat()
    let firstExists = stat(a, &first) == 0, secondExists = stat(b, &second) == 0
    if firstExists || secondExists {
        return firstExists && secondExists && first.st_dev == second.st_dev && first.st_ino == second.st_ino
    }
    return place(a) == place(b)
}

/// Where a file that does not exist yet would be: its folder with links resolved, then its name.
private func place(_ path: String) -> String {
    let url = URL(fileURLWithPath: path).standardizedFileURL
    return url.deletingLastPathComponent().resolvingSymlinksInPath().appendingPathComponent(url.lastPathComponent).path
}
