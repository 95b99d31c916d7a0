import ArgumentParser
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation

extension RunCommand {
    /// `--transport nccl`: as a rank (spawned, or under mpirun / torchrun) run the cases and print
    /// one result line each; otherwise spawn `--ranks` ranks, one per GPU, and report their results.
    func runNCCL() throws {
        let nccl = try NCCLLibrary.shared()
        guard let me = NCCLRankEnvironment.current() else {
            let ranks = shape.ranks ?? 2
            let id = try nccl.uniqueID()
            let v = try nccl.version()
            FileHandle.standardError.write(Data("spawning \(ranks) NCCL ranks (NCCL \(v.major).\(v.minor).\(v.patch) at \(nccl.location))...\n".utf8))
            let children = try NCCLLauncher.spawn(ranks: ranks, id: id, arguments: Array(CommandLine.arguments.dropFirst()))
            if let drill { return try drill.judge(children, failing: drillRank, timeout: timeout) }
            var results: [Measurement] = []
            for child in children {
                for line in child.output.split(separator: "\n") where line.hasPrefix(Self.resultPrefix) {
                    results.append(try JSONDecoder().decode(Measurement.self, from: Data(line.dropFirst(Self.resultPrefix.count).utf8)))
                }
            }
            // Each rank measured its own copy bandwidth; the entries carry it.
            let record = runRecord(
                backend: "gpu-nccl-\(sharing.rawValue)", device: results.first?.device ?? "NCCL ranks",
                facts: DeviceFacts(driver: try? DriverLibrary.shared(), nccl: nccl), copyBandwidth: nil,
                iterations: iterations ?? 100, warmup: max(warmup, 5))
            try report(results, record)
            if let failed = children.firstIndex(where: { $0.status != 0 }) {
                throw RunFailure("rank \(failed) exited with status \(children[failed].status)")
            }
            if let invalid = results.first(where: { !$0.validated }) {
                throw RunFailure("rank \(invalid.rank ?? -1) of \(invalid.name): results differ from the CPU oracle")
            }
            return
        }
        let device = try GPUDevice(ordinal: me.deviceOrdinal)
        // Every rank checks the SM counts against its own GPU before joining (the same GPUs: all alike).
        try gpu.check(device: device.multiprocessors)
        let id = try me.uniqueID(nccl, timeout: .seconds(60))
        if let drill { return try drill.act(rank: me, failing: drillRank, nccl: nccl, id: id, device: device, sharing: sharing, timeout: timeout) }
        let comm = try nccl.initRank(ranks: me.world, id: id, rank: me.rank, timeout: timeout)
        var closed = false
        defer { if !closed { try? nccl.abort(comm) } }
        let tuning = gpu.tuning
        var runner = NCCLBenchmark(device: device, nccl: nccl, comm: comm, rank: me.rank, iterations: iterations ?? 100,
                                   warmup: max(warmup, 5), seed: seed, skew: skew, tuning: tuning, sharing: sharing, timeout: timeout)
        let copyBandwidth = try GPUBenchmark(device: device, iterations: 1, warmup: 0, seed: seed, skew: skew, tuning: tuning)
            .measureCopyBandwidth()
        // The group is the communicator: every case runs with R = its size, experts unchanged.
        let selected = try casesOfJob(world: me.world, rank: me.rank)
        // Once per --sms count (or once with every SM), as on one GPU.
        let counts: [Int?] = gpu.smCounts.isEmpty ? [nil] : gpu.smCounts
        for benchCase in selected {
            for sms in counts {
                runner.multiprocessors = sms
                let measurement = try runner.run(benchCase, copyBandwidth: copyBandwidth)
                let line = String(decoding: try JSONEncoder().encode(measurement), as: UTF8.self)
                print(Self.resultPrefix + line)
            }
        }
        closed = true   // close aborts the communicator itself when the others do not answer
        try nccl.close(comm, timeout: timeout)
    }

    var timeout: Duration { .milliseconds(timeoutMs) }

    /// The cases a job of `world` NCCL ranks runs, each with R = `world`. A case whose experts
    /// `world` does not divide cannot run: with --experts (every case's) a usage error naming
    /// --experts; else one named with --case is a usage error naming it; a default one is left out
    /// with a note on stderr (rank 0's, with `note`), and none left is an error. At a rank of an
    /// mpirun or torchrun job `validate()` asks first (checkLaunchedRank).
    func casesOfJob(world: Int, rank: Int, note: Bool = true) throws -> [BenchCase] {
        let resolved = try shape.resolve(defaults: Defaults.nccl)
        if let experts = shape.experts, experts % world != 0 {
            throw ValidationError("--experts \(experts) is not a multiple of this job's \(world) NCCL ranks")
        }
        let left = resolved.filter { $0.experts % world != 0 }
        if let first = left.first, !shape.cases.isEmpty {
            throw ValidationError("--case \(first.name): its \(first.experts) experts are not a multiple of this job's \(world) NCCL ranks")
        }
        let kept = resolved.filter { $0.experts % world == 0 }
        if kept.isEmpty {
            throw ValidationError("none of the cases (\(resolved.map(\.name).joined(separator: ", "))) has experts a multiple of this job's \(world) NCCL ranks: name one that has with --case, or give --experts")
        }
        if note, rank == 0, !left.isEmpty {
            let names = left.map { "\($0.name) (\($0.experts) experts)" }.joined(separator: ", ")
            FileHandle.standardError.write(Data("note: left out \(names): not a multiple of this job's \(world) ranks\n".utf8))
        }
        return kept.map { $0.with(ranks: world) }
    }

    /// A drill runs its step (`FailureDrill.step`) over `--ranks` NCCL ranks (default 2), one of
    /// which fails: another must be there to report it (with one rank the verdict had no rank to
    /// judge, and passed), and the step must be one the GPU groups can build with that many ranks.
    func checkDrillRanks() throws {
        let ranks = shape.ranks ?? 2, step = FailureDrill.step
        guard ranks >= 2 else {
            throw ValidationError("--ranks \(ranks) is too few for --drill: it needs at least 2 ranks, one that fails and one that reports it")
        }
        guard step.experts % ranks == 0 else {
            throw ValidationError("--ranks \(ranks) does not divide the \(step.experts) experts of case \(step.name), the step of --drill")
        }
        try shape.checkForGPU([step.with(ranks: ranks)])
    }

    static let resultPrefix = "EPRESULT "
}
