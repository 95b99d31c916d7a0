import ArgumentParser
import ExpertParallel
import Foundation

enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, cpu, gpu
}

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Time update, dispatch and combine on the standard cases, validate the results, and print a table.")

    @Option(name: .customLong("case"), help: "Case to run (repeatable): \(BenchCase.names.joined(separator: ", ")). Default: ll-std and ht-cpu on the CPU.")
    var cases: [String] = []

    @Option(help: "Backend: auto (GPU if one is found, else CPU), cpu, gpu.")
    var backend: BackendChoice = .auto

    @Option(help: "Ranks of the group (overrides the case's R).")
    var ranks: Int?

    @Option(help: "Measured iterations (default: 5 on the CPU, 100 on the GPU).")
    var iterations: Int?

    @Option(help: "Warm-up iterations.")
    var warmup: Int = 1

    @Option(help: "Routing skew: 0 is uniform; larger values concentrate traffic on low expert ids.")
    var skew: Double = 0

    @Option(help: "Seed of the routing and payload.")
    var seed: UInt64 = 1

    @Option(help: "Write the results as JSON to this path.")
    var json: String?

    func validate() throws {
        for name in cases where !BenchCase.names.contains(name) {
            throw ValidationError("unknown case '\(name)'; known cases: \(BenchCase.names.joined(separator: ", "))")
        }
        if let ranks, ranks < 1 { throw ValidationError("--ranks must be ≥ 1, got \(ranks)") }
        if let iterations, iterations < 1 { throw ValidationError("--iterations must be ≥ 1, got \(iterations)") }
        if skew < 0 { throw ValidationError("--skew must be ≥ 0, got \(skew)") }
    }

    func run() throws {
        let useGPU = backend == .gpu
        if useGPU { throw ValidationError("the GPU backend is not part of this build yet; use --backend cpu") }
        let names = cases.isEmpty ? ["ll-std", "ht-cpu"] : cases
        var selected = BenchCase.standard.filter { names.contains($0.name) }
        if let ranks {
            selected = selected.map { c in
                var c = c
                c.experts = c.experts / c.ranks * ranks
                c.ranks = ranks
                return c
            }
        }
        let copyBandwidth = HostBenchmark.measureCopyBandwidth()
        print("backend cpu: memcpy bandwidth \(format(copyBandwidth, 1)) GB/s (read + write)")
        let runner = HostBenchmark(iterations: iterations ?? 5, warmup: warmup, seed: seed, skew: skew)
        var results: [Measurement] = []
        for benchCase in selected {
            FileHandle.standardError.write(Data("running \(benchCase.label) on the CPU...\n".utf8))
            results.append(try runner.run(benchCase, copyBandwidth: copyBandwidth))
        }
        print(Table.render(results))
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try encoder.encode(results).write(to: URL(fileURLWithPath: json))
            print("wrote \(json)")
        }
    }
}

func format(_ value: Double, _ digits: Int) -> String { String(format: "%.\(digits)f", value) }
