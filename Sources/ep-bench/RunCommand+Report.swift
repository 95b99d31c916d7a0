import ArgumentParser
import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation

extension RunCommand {
    /// The table, the JSON file when asked for (a list of measurements, each with `run`), and the
    /// plot when asked for (drawn from that same JSON, as `ep-bench plot` draws it from the file).
    func report(_ results: [Measurement], _ record: RunRecord) throws {
        print(Table.render(results))
        guard json != nil || plot != nil else { return }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let entries = results.map { result in
            var entry = result
            entry.run = record
            return entry
        }
        let data = try encoder.encode(entries)
        if let json {
            do {
                try data.write(to: URL(fileURLWithPath: json))
            } catch {
                // Checked writable before the run; this is a disk that filled or a folder that went.
                throw RunFailure("--json \(json): could not write the results (\(error.localizedDescription))")
            }
            print("wrote \(json)")
        }
        if let plot {
            let svg = try Plot(engine: PlotEntry.decode(data, from: "the run's results")).svg()
            do {
                try Data(svg.utf8).write(to: URL(fileURLWithPath: plot))
            } catch {
                throw RunFailure("--plot \(plot): could not write the plot (\(error.localizedDescription))")
            }
            print("wrote \(plot)")
        }
    }

    /// Exit status 1 when any case's results differ from the CPU oracle (the table says which).
    static func requireValidated(_ results: [Measurement]) throws {
        let failed = results.filter { !$0.validated }
        guard !failed.isEmpty else { return }
        let names = failed.map { result in result.rank.map { "\(result.name) (rank \($0))" } ?? result.name }
        FileHandle.standardError.write(Data("Error: results differ from the CPU oracle: \(names.joined(separator: ", "))\n".utf8))
        throw ExitCode.failure
    }

    /// The versions of the libraries a GPU run used ("12.8"; nil where a run did not load them),
    /// and the kernel variant its step kernels were compiled as (nil: the default kernels).
    struct DeviceFacts {
        var driverVersion: String?
        var nvrtcVersion: String?
        var ncclVersion: String?
        var kernelDefines: String?

        init() {}

        init(driver: DriverLibrary?, nccl: NCCLLibrary? = nil) {
            driverVersion = (driver.flatMap { try? $0.driverVersion() }).map { "\($0 / 1000).\($0 % 1000 / 10)" }
            nvrtcVersion = (try? NVRTCLibrary.shared()).map { "\($0.version.major).\($0.version.minor)" }
            ncclVersion = (nccl.flatMap { try? $0.version() }).map { "\($0.major).\($0.minor).\($0.patch)" }
            kernelDefines = KernelVariant.defines
        }
    }

    func runRecord(backend: String, device: String, facts: DeviceFacts, copyBandwidth: Double?, iterations: Int, warmup: Int) -> RunRecord {
        let commit = SourceCommit.current()
        return RunRecord(
            version: expertParallelVersion, commit: commit.commit, commitModified: commit.modified, commitSource: commit.source,
            backend: backend, transport: transport.rawValue, device: device, driverVersion: facts.driverVersion,
            nvrtcVersion: facts.nvrtcVersion, ncclVersion: facts.ncclVersion, kernelDefines: facts.kernelDefines, copyBandwidthGBs: copyBandwidth, seed: seed,
            iterations: iterations, warmup: warmup, tuning: gpu.record, options: optionsRecord,
            arguments: Array(CommandLine.arguments.dropFirst()))
    }

    var optionsRecord: OptionsRecord {
        OptionsRecord(
            cases: shape.cases, backend: backend.rawValue, transport: transport.rawValue, ranks: shape.ranks, tokens: shape.tokens, tokenCounts: shape.tokenCounts, maxTokens: shape.maxTokens,
            hidden: shape.hidden, topK: shape.topK, experts: shape.experts, layout: shape.layout?.rawValue, alignment: shape.alignment,
            dtype: shape.dtype.rawValue, fp8: shape.fp8?.rawValue, fp8Source: shape.fp8Source?.rawValue, iterations: iterations, warmup: warmup, skew: skew, seed: seed, sms: gpu.smCounts,
            pipelineDepth: gpu.pipelineDepth, rowsInFlight: gpu.rowsInFlight, rowPieces: gpu.rowPieces, blocksPerSM: gpu.blocksPerSM,
            updateChunkTokens: gpu.updateChunkTokens, fullGrid: gpu.fullGrid, serialLaunches: gpu.serialLaunches,
            fusedUpdate: gpu.fusedUpdate, sharing: sharing.rawValue, drill: drill?.rawValue, drillRank: drillRank, timeoutMs: timeoutMs, progress: progress, json: json, plot: plot)
    }
}
