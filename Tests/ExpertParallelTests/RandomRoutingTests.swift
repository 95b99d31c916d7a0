import ExpertParallel
import Foundation
import Testing

/// `RandomRouting` refuses counts it cannot honour with a named error (it trapped on them) and
/// picks the same experts as sorting every score would.
@Suite("Random routing")
struct RandomRoutingTests {
    static func argument(_ field: String, _ value: Int, _ requirement: String) -> EPError {
        .invalidArgument(field: field, value: "\(value)", requirement: requirement)
    }

    @Test("negative, overflowing and inconsistent counts are named errors, not traps")
    func badCountsThrow() {
        var random = RandomRouting(seed: 1)
        #expect(throws: Self.argument("tokens", -1, "must be ≥ 0")) { try random.experts(tokens: -1, topK: 2, experts: 4) }
        #expect(throws: Self.argument("tokens", Int.min, "must be ≥ 0")) { try random.experts(tokens: .min, topK: 2, experts: 4) }
        #expect(throws: Self.argument("experts", -4, "must be ≥ 0")) { try random.experts(tokens: 2, topK: 2, experts: -4) }
        #expect(throws: Self.argument("experts", Int.max, "must be ≤ 2147483647 (expert ids are int32)")) {
            try random.experts(tokens: 1, topK: 1, experts: .max)
        }
        #expect(throws: Self.argument("topK", -1, "must be ≥ 0")) { try random.experts(tokens: 2, topK: -1, experts: 4) }
        #expect(throws: Self.argument("topK", 5, "must be ≤ experts (4): a token's K experts are distinct")) {
            try random.experts(tokens: 2, topK: 5, experts: 4)
        }
        #expect(throws: Self.argument("count", -1, "must be ≥ 0")) { try random.weights(-1) }
        #expect(throws: Self.argument("count", Int.min, "must be ≥ 0")) { try random.payload(.min, .bf16) }
    }

    @Test("a result larger than memory (or than Int) is outOfMemory before anything is allocated")
    func hugeResultsAreOutOfMemory() {
        func isOutOfMemory(_ call: (inout RandomRouting) throws(EPError) -> Void) -> Bool {
            var random = RandomRouting(seed: 2)
            do throws(EPError) { try call(&random) } catch {
                if case .outOfMemory = error { return true }
            }
            return false
        }
        #expect(isOutOfMemory { r throws(EPError) in _ = try r.experts(tokens: .max, topK: 2, experts: 4) })
        #expect(isOutOfMemory { r throws(EPError) in _ = try r.experts(tokens: 1 << 40, topK: 32, experts: 64) })
        #expect(isOutOfMemory { r throws(EPError) in _ = try r.weights(.max) })
        #expect(isOutOfMemory { r throws(EPError) in _ = try r.payload(.max, .f32) })
        #expect(isOutOfMemory { r throws(EPError) in _ = try r.payload(1 << 61, .bf16) })
    }

    @Test("empty shapes are empty results")
    func emptyShapes() throws {
        var random = RandomRouting(seed: 3)
        #expect(try random.experts(tokens: 0, topK: 2, experts: 4).isEmpty)
        #expect(try random.experts(tokens: 5, topK: 0, experts: 4).isEmpty)
        #expect(try random.experts(tokens: 5, topK: 0, experts: 0).isEmpty)
        #expect(try random.weights(0).isEmpty)
        #expect(try random.payload(0, .f16).isEmpty)
    }

    /// The routing as it was made before: every expert's score sorted, best first, ties to the
    /// lower id; the first K.
    static func sorted(_ random: inout RandomRouting, tokens: Int, topK: Int, experts: Int, skew: Double) -> [Int32] {
        var result: [Int32] = []
        var scores = [(Float, Int32)](repeating: (0, 0), count: experts)
        for _ in 0..<tokens {
            for e in 0..<experts {
                var score = random.unit()
                if skew > 0 { score *= Float(pow(1 + skew, -Double(e) / Double(experts) * 8)) }
                scores[e] = (score, Int32(e))
            }
            scores.sort { $0.0 > $1.0 || ($0.0 == $1.0 && $0.1 < $1.1) }
            result.append(contentsOf: scores.prefix(topK).map(\.1))
        }
        return result
    }

    @Test("the K best scores are the first K of every score sorted, ties to the lower id", arguments: [
        (8, 1, 0.0), (8, 8, 0.0), (256, 8, 0.0), (96, 10, 0.5), (64, 32, 3.0), (16, 4, Double.infinity), (1, 1, 0.0),
    ])
    func selectionMatchesTheSort(experts: Int, topK: Int, skew: Double) throws {
        for seed: UInt64 in [0, 7, 1234] {
            var fast = RandomRouting(seed: seed), slow = RandomRouting(seed: seed)
            let picked = try fast.experts(tokens: 33, topK: topK, experts: experts, skew: skew)
            #expect(picked == Self.sorted(&slow, tokens: 33, topK: topK, experts: experts, skew: skew))
            #expect(fast.state == slow.state, "the same draws")
        }
    }
}
