import ArgumentParser
import ExpertParallel
import ExpertParallelGPU

/// Options given to a run that would do nothing with them are usage errors before anything runs,
/// naming each option (and its value) and why it does not apply, instead of a run that ignores
/// them without a word (docs/ep-bench.md, "Options a run would ignore").
extension RunCommand {
    /// What the command line tells: checked in `validate()`. `cases`: the cases of a run whose
    /// backend is known to be a GPU (`--backend gpu`, `--transport nccl`); nil for others (`--backend
    /// auto` knows its cases once it has looked for a GPU, and `runOnGPU` checks them then).
    func checkOptionsApply(cases: [BenchCase]?) throws {
        if backend == .cpu { try refuseGPUOptions(on: "--backend cpu") }
        if transport == .virtual {
            let nccl = [drill.map { "--drill \($0.rawValue)" }, givenSharing.map { "--sharing \($0.rawValue)" },
                        givenTimeoutMs.map { "--timeout-ms \($0)" }]
            try refuse(nccl.compactMap { $0 }, "--transport nccl", "this run uses --transport virtual")
        }
        if let drill { try refuseUntimedByDrill(drill) }
        if drill == nil, let givenDrillRank { try refuse(["--drill-rank \(givenDrillRank)"], "--drill", "this run has no --drill") }
        if transport == .nccl {
            if gpu.serialLaunches {
                try refuse(["--serial-launches"], "virtual ranks", "NCCL ranks (--transport nccl) launch plainly already")
            }
            if progress { try refuse(["--progress"], "--transport virtual", "NCCL ranks print no progress lines") }
            try checkLaunchedRank(NCCLRankEnvironment.current())
        }
        if shape.dtype == .u8, let rows = gpu.givenRowsInFlight {
            try refuse(["--rows-in-flight \(rows)"], "combine", "--dtype u8 is dispatch only: no combine runs")
        }
        if let cases { try checkAlgorithmOptions(cases) }
    }

    /// The GPU's options on the CPU backend, `which`: chosen (`--backend cpu`), or the one
    /// `--backend auto` fell back to (`runOnCPU`), which refuses them as `--backend cpu` does.
    func refuseGPUOptions(on which: String) throws {
        try refuse(gpu.given, "the GPU backend", "this run uses \(which), which runs no kernels")
    }

    /// The options of the algorithm none of `cases` has: `--fused-update` (LL), `--update-chunk-tokens` (HT).
    func checkAlgorithmOptions(_ cases: [BenchCase]) throws {
        func names(_ algorithm: Algorithm) -> String {
            var seen: [String] = []
            for c in cases where c.algorithm == algorithm && !seen.contains(c.name) { seen.append(c.name) }
            return seen.joined(separator: ", ")
        }
        if let fused = gpu.fusedUpdate, !cases.contains(where: { $0.algorithm == .lowLatency }) {
            try refuse([fused ? "--fused-update" : "--no-fused-update"], "LL cases", "this run's cases (\(names(.highThroughput))) are HT")
        }
        if let chunk = gpu.givenUpdateChunkTokens, !cases.contains(where: { $0.algorithm == .highThroughput }) {
            try refuse(["--update-chunk-tokens \(chunk)"], "HT cases", "this run's cases (\(names(.lowLatency))) are LL")
        }
    }

    /// Under mpirun or torchrun (an id file, not the id ep-bench gives the ranks it spawns) each
    /// rank prints its results as result lines: no rank writes --json or --plot, the job, not
    /// --ranks, sets the ranks, and a case the job's size cannot run is refused here, before the
    /// rank opens its GPU and joins the job (`casesOfJob`).
    func checkLaunchedRank(_ me: NCCLRankEnvironment?) throws {
        guard let me, me.idFile != nil else { return }
        let outputs = [json.map { "--json \($0)" }, plot.map { "--plot \($0)" }].compactMap { $0 }
        try refuse(outputs, "the ranks ep-bench spawns", "under mpirun or torchrun each rank prints its results (\(Self.resultPrefix)lines) and none writes a file")
        if let ranks = shape.ranks, ranks != me.world {
            throw ValidationError("--ranks \(ranks) is not this job's \(me.world) ranks: under mpirun or torchrun the job sets the ranks")
        }
        if drill == nil { _ = try casesOfJob(world: me.world, rank: me.rank, note: false) }
    }

    /// A drill runs one untimed step of ll-std over --ranks ranks, seed 1: what shapes, times,
    /// tunes or reports the cases' runs does nothing there.
    private func refuseUntimedByDrill(_ drill: FailureDrill) throws {
        let run = [iterations.map { "--iterations \($0)" }, givenWarmup.map { "--warmup \($0)" }, givenSkew.map { "--skew \($0)" },
                   givenSeed.map { "--seed \($0)" }, progress ? "--progress" : nil, json.map { "--json \($0)" }, plot.map { "--plot \($0)" }]
        let ignored = shape.given.filter { $0.option != "--ranks" }.map(\.text) + run.compactMap { $0 } + gpu.given
        try refuse(ignored, "the cases' timed runs", "--drill \(drill.rawValue) runs one untimed ll-std step instead (it takes --ranks, --drill-rank, --timeout-ms and --sharing)")
    }

    /// "`given` applies to `target`; `instead`" (nothing when none is given).
    private func refuse(_ given: [String], _ target: String, _ instead: String) throws {
        guard !given.isEmpty else { return }
        let names = given.count == 1 ? given[0] : given.dropLast().joined(separator: ", ") + " and " + given.last!
        throw ValidationError("\(names) \(given.count == 1 ? "applies" : "apply") to \(target); \(instead)")
    }
}
