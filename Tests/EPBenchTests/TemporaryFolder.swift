import Foundation

/// A new empty folder under the system's temporary folder, removed when the value goes.
final class TemporaryFolder {
    let path: String

    init() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("ep-bench-tests-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// `name` in the folder, written with `text` when given.
    func file(_ name: String, _ text: String? = nil) throws -> String {
        let file = "\(path)/\(name)"
        if let text { try Data(text.utf8).write(to: URL(fileURLWithPath: file)) }
        return file
    }
}
