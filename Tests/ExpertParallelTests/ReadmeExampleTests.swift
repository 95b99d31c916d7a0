import ExpertParallel
import Foundation
import Testing

/// The README's usage example, verbatim in its body, so that it cannot rot.
@Test func readmeExampleCompilesAndCombinesWeightedRows() throws {
    let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8,
                             elementType: .f32, maxTokensPerRank: 2, layout: .expertMajor)
    let group = try HostGroup(config)
    let combined = group.run { rank throws(EPError) -> [Float] in
        let x = try HostTensor(.f32, [1, 8]);    try x.copy(from: [Float](repeating: 1, count: 8))
        let idx = try HostTensor(.i32, [1, 2]);  try idx.copy(from: [Int32(0), Int32(3)])   // experts 0 and 3
        let w = try HostTensor(.f32, [1, 2]);    try w.copy(from: [Float(0.25), Float(0.5)])
        let received = try HostTensor(.f32, config.receiveShape)              // [L, R*Bmax, H]
        let y = try HostTensor(.f32, [1, 8])

        let handle = try rank.makeHandle()
        try rank.update(handle, topkIdx: idx.ref)
        let info = try rank.dispatch(handle, DispatchInput(tokens: x.ref), into: DispatchOutput(tokens: received.ref),
                                     direction: .forward)
        _ = info.expertCounters                                               // rows per local expert
        // ... run the local experts on `received` (here: the identity) ...
        try rank.combine(handle, CombineInput(expertOutputs: received.ref, topkWeights: w.ref),
                         into: CombineOutput(tokens: y.ref), direction: .forward)
        return try y.array(of: Float.self)                                        // 0.75 everywhere
    }
    for result in combined {
        #expect(try result.get() == [Float](repeating: 0.75, count: 8))
    }
}

private let readmePath = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("README.md")

/// Every line of the README's Swift example appears in the test above. Runs where the sources
/// are (here and in CI), not where only the test binary was carried (the GPU machine).
@Test(.enabled(if: FileManager.default.fileExists(atPath: readmePath.path), "needs the source tree"))
func readmeExampleMatchesThisTest() throws {
    let here = URL(fileURLWithPath: #filePath)
    let readme = try String(contentsOf: readmePath, encoding: .utf8)
    let test = try String(contentsOf: here, encoding: .utf8)
    let example = try #require(readme.components(separatedBy: "```swift\n").dropFirst().first?.components(separatedBy: "```").first)
    let testLines = Set(test.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) })
    for line in example.split(separator: "\n") where !line.hasPrefix("import") {
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        #expect(testLines.contains(trimmed), "README line not in ReadmeExampleTests.swift: \(trimmed)")
    }
}
