import ArgumentParser
import ExpertParallel
import ExpertParallelGPU
import Foundation

extension CaseOptions {
    /// The cases to run: those named (or `defaults`), in the standard order, then `custom`, with
    /// the options' overrides applied, each checked as the library checks a configuration and
    /// against this host's memory. Every failure is a `ValidationError` naming the option.
    /// With several `--tokens`, each case once per count, in the order given, a case's runs together.
    func resolve(defaults: [String]) throws -> [BenchCase] {
        if let maxTokens, let largest = tokenCounts.max(), maxTokens < largest {
            let what = tokenCounts.count == 1 ? "--tokens \(largest)" : "\(largest), the largest of --tokens \(tokenCounts.map(String.init).joined(separator: ","))"
            throw maxTokensError(largest, what)
        }
        let perCount = try (tokenCounts.isEmpty ? [nil] : tokenCounts.map { Optional($0) }).map { try resolve(defaults: defaults, tokens: $0) }
        return (0..<perCount[0].count).flatMap { i in perCount.map { $0[i] } }
    }

    private func resolve(defaults: [String], tokens: Int?) throws -> [BenchCase] {
        let explicit = !cases.isEmpty
        let names = explicit ? cases : defaults
        var selected: [BenchCase] = []
        for benchCase in BenchCase.standard where names.contains(benchCase.name) {
            if let layout, layout.algorithm != benchCase.algorithm {
                // A case of both algorithms (odd) runs its variant of the layout's algorithm;
                // without --case, the defaults of the other algorithm are left out.
                let hasVariant = BenchCase.standard.contains { $0.name == benchCase.name && $0.algorithm == layout.algorithm }
                if hasVariant || !explicit { continue }
                throw ValidationError(
                    "--layout \(layout.rawValue) is not a layout of case \(benchCase.name) (\(benchCase.algorithm.shortName)); "
                        + "its layouts: \(LayoutChoice.names(of: benchCase.algorithm))")
            }
            selected.append(overridden(benchCase, tokens: tokens))
        }
        if names.contains(Self.customName) { selected.append(try custom(tokens: tokens)) }
        if selected.isEmpty, let layout {
            throw ValidationError(
                "--layout \(layout.rawValue): none of the default cases (\(defaults.joined(separator: ", "))) is \(layout.algorithm.shortName); name one with --case")
        }
        // Without --tokens each case steps its own B: M must hold the largest (with, resolve() checked).
        if let maxTokens, let largest = selected.max(by: { $0.tokens < $1.tokens }), maxTokens < largest.tokens {
            throw maxTokensError(largest.tokens, "the \(largest.tokens) tokens per rank of case \(largest.name)")
        }
        for benchCase in selected { try check(benchCase) }
        return selected
    }

    private func overridden(_ benchCase: BenchCase, tokens: Int?) -> BenchCase {
        var copy = benchCase
        copy.ranks = ranks ?? copy.ranks
        copy.tokens = tokens ?? copy.tokens
        copy.hidden = hidden ?? copy.hidden
        copy.topK = topK ?? copy.topK
        copy.experts = experts ?? copy.experts
        if let layout { copy.layout = layout.layout(alignment: alignment ?? 1) }
        copy.elementType = dtype.dataType
        copy.fp8 = fp8Dispatch
        copy.maxTokens = maxTokens
        return copy
    }

    private func custom(tokens: Int?) throws -> BenchCase {
        let missing = shapeOverrides.filter { $0.value == nil }.map(\.option)
        guard missing.isEmpty, let tokens, let hidden, let topK, let experts, let ranks else {
            throw ValidationError("case custom has no shape of its own: give \(missing.joined(separator: ", "))")
        }
        let choice = layout ?? .expertMajor
        return BenchCase(
            name: Self.customName, algorithm: choice.algorithm, tokens: tokens, hidden: hidden, topK: topK, experts: experts,
            ranks: ranks, layout: choice.layout(alignment: alignment ?? 1), elementType: dtype.dataType, fp8: fp8Dispatch,
            maxTokens: maxTokens)
    }

    /// The relations between the values (named by the options that set them), then the library's
    /// own check, then the host memory.
    private func check(_ c: BenchCase) throws {
        func value(_ option: String, _ given: Int?, _ actual: Int, _ what: String) -> String {
            given != nil ? "\(option) \(actual)" : "the \(actual) \(what) of case \(c.name)"
        }
        if c.experts % c.ranks != 0 {
            if let ranks, experts == nil { throw ValidationError("--ranks \(ranks) does not divide the \(c.experts) experts of case \(c.name)") }
            throw ValidationError("--experts \(c.experts) is not a multiple of \(value("--ranks", ranks, c.ranks, "ranks"))")
        }
        if c.topK > c.experts {
            if let topK { throw ValidationError("--topk \(topK) is more than \(value("--experts", experts, c.experts, "experts"))") }
            throw ValidationError("--experts \(c.experts) is fewer than the top-k \(c.topK) of case \(c.name)")
        }
        let rowBytes = c.hidden * c.elementType.byteSize
        if rowBytes % 8 != 0 {
            throw ValidationError(
                "\(value("--hidden", hidden, c.hidden, "hidden size")) × \(c.elementType.byteSize) bytes (--dtype \(c.elementType)) = \(rowBytes) bytes: a row must be a multiple of 8 bytes")
        }
        do throws(EPError) { _ = try c.config().validated() } catch { throw usageError(error, c) }
        let needed = c.hostBytes, available = Int(clamping: ProcessInfo.processInfo.physicalMemory)
        if needed > available {
            throw ValidationError(
                "case \(c.name) (\(c.label)) needs about \(needed >> 20) MiB of host memory for its inputs, outputs and routing, more than this machine's \(available >> 20) MiB: lower \((shapeOverrides.map(\.option) + (maxTokens == nil ? [] : ["--max-tokens"])).joined(separator: ", "))")
        }
        // The routing's work grows with tokens × experts × ranks, which the memory does not bound.
        let scores = c.tokens * c.experts * c.ranks   // each bounded (Bounds): no overflow
        if scores > Bounds.routingScores {
            let product = [value("--tokens", tokenCounts.first, c.tokens, "tokens"), value("--experts", experts, c.experts, "experts"),
                           value("--ranks", ranks, c.ranks, "ranks")].joined(separator: " × ")
            throw ValidationError(
                "\(product) = \(scores) random expert scores for the routing of case \(c.name) (\(c.label)), more than \(Bounds.routingScores) (2^32): lower --tokens, --experts or --ranks")
        }
    }

    /// The GPU backend's own bounds (at most 32 ranks, 1024 experts, the update kernel's shared
    /// memory), checked once the run knows it is on the GPU, before anything runs.
    func checkForGPU(_ cases: [BenchCase]) throws {
        for c in cases {
            do throws(EPError) { _ = try c.config().validatedForGPU() } catch { throw usageError(error, c, on: " on the GPU") }
        }
    }

    /// The tuning's checks for every case (`GPUTuning.validated`), with a knob named as the option
    /// that sets it (the CPU backend refuses every knob given: RunCommand+Applicable.swift).
    func checkTuning(_ tuning: GPUTuning, _ cases: [BenchCase]) throws {
        let options = ["tuning.pipelineDepth": "--pipeline-depth", "tuning.rowsInFlight": "--rows-in-flight",
                       "tuning.rowPieces": "--row-pieces", "tuning.updateChunkTokens": "--update-chunk-tokens",
                       "tuning.blocksPerMultiprocessor": "--blocks-per-sm"]
        for c in cases {
            do throws(EPError) { _ = try tuning.validated(c.config()) } catch {
                guard case let .invalidArgument(field, value, requirement) = error, let option = options[field] else {
                    throw usageError(error, c)
                }
                throw ValidationError("\(option) \(value) (case \(c.name)): \(requirement)")
            }
        }
    }

    /// `--max-tokens` below the `bound` tokens per rank a step of the run dispatches (`what` says
    /// whose): the group could not take them.
    private func maxTokensError(_ bound: Int, _ what: String) -> ValidationError {
        ValidationError(
            "--max-tokens \(maxTokens ?? 0) is out of range: must be in \(bound)...\(Bounds.tokens.upperBound) (at least \(what): the group must hold every step's tokens)")
    }

    /// A library error about a configuration, with its field named as the option that sets it.
    private func usageError(_ error: EPError, _ c: BenchCase, on backend: String = "") -> ValidationError {
        guard case let .invalidConfig(field, value, requirement) = error else { return ValidationError("case \(c.name)\(backend): \(error)") }
        let options = ["ranks": "--ranks", "experts": "--experts", "topK": "--topk", "hidden": "--hidden", "maxTokensPerRank": maxTokens == nil ? "--tokens" : "--max-tokens",
                       "elementType": "--dtype", "layout": "--layout", "layout.alignment": "--alignment", "fp8": "--fp8"]
        return ValidationError("\(options[field] ?? field) \(value) (case \(c.name)\(backend)): \(requirement)")
    }
}

extension BenchCase {
    /// Host bytes a run of this case allocates, all ranks together (saturating): inputs (rows,
    /// weights, routing), the receive and combine buffers, and the library's routing metadata.
    var hostBytes: Int {
        // (Every value here is ≥ 0: Saturating's products and sums stop at Int.max.)
        func mul(_ values: Int...) -> Int { values.reduce(1, Saturating.product) }
        func add(_ values: Int...) -> Int { values.reduce(0, Saturating.sum) }
        let config = config()
        let size = elementType.byteSize, capacity = config.receiveCapacity
        var perRank = add(mul(2, tokens, hidden, size), mul(4, tokens, topK, 4), mul(capacity, hidden, size), mul(capacity, topK, 8))
        if let format = config.fp8Format {
            // FP8: the e4m3 receive rows and their scales (the plain rows stay, as the oracle's
            // dispatch and combine's expert outputs), and pass-through's e4m3 source rows and scales.
            let wire = add(hidden, mul(4, format.scaleWordsPerRow))
            perRank = add(perRank, mul(capacity, wire), config.fp8?.source == .passThrough ? mul(tokens, wire) : 0)
        }
        // FP8 runs a second (plain) group for the oracle's dispatch: its metadata too.
        return add(mul(perRank, ranks), mul(config.fp8 == nil ? 1 : 2, config.hostStepBytes(tokens: tokens)))
    }
}
