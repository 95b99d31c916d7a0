// Build-time tool: writes a Swift file that holds the given CUDA source files as string
// constants, so the kernels travel inside the binary and nothing is looked up at run time.
// Run by the EmbedKernels plugin:  embed-kernels OUTPUT.swift INPUT.cu…
import Foundation

let arguments = CommandLine.arguments.dropFirst()
guard let outputPath = arguments.first else {
    FileHandle.standardError.write(Data("usage: embed-kernels OUTPUT.swift INPUT.cu...\n".utf8))
    exit(2)
}

/// A raw string delimiter (`#…#`) long enough that the text cannot end the literal early
/// or be read as an escape.
func rawDelimiter(for text: String) -> String {
    var hashes = "#"
    while text.contains("\"\"\"" + hashes) || text.contains("\\" + hashes) { hashes += "#" }
    return hashes
}

var entries: [String] = []
for inputPath in arguments.dropFirst().sorted(by: { ($0 as NSString).lastPathComponent < ($1 as NSString).lastPathComponent }) {
    let name = (inputPath as NSString).lastPathComponent
    guard let text = try? String(contentsOfFile: inputPath, encoding: .utf8) else {
        FileHandle.standardError.write(Data("embed-kernels: cannot read \(inputPath) as UTF-8\n".utf8))
        exit(1)
    }
    let hashes = rawDelimiter(for: text)
    // A multi-line literal drops the newline before its closing delimiter: add one back.
    entries.append("    (name: \"\(name)\", text: \(hashes)\"\"\"\n\(text)\n\"\"\"\(hashes)),")
}

let output = """
    // Generated at build time by embed-kernels from Sources/ExpertParallelKernels/Kernels. Do not edit.

    /// Every kernel source file, sorted by name.
    let embeddedKernelFiles: [(name: String, text: String)] = [
    \(entries.joined(separator: "\n"))
    ]

    """
do {
    let existing = try? String(contentsOfFile: outputPath, encoding: .utf8)
    if existing != output { try output.write(toFile: outputPath, atomically: true, encoding: .utf8) }
} catch {
    FileHandle.standardError.write(Data("embed-kernels: cannot write \(outputPath): \(error)\n".utf8))
    exit(1)
}
