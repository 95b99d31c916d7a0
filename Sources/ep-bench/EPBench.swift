import ArgumentParser

@main
struct EPBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ep-bench",
        abstract: "Benchmarks ExpertParallel dispatch and combine on the standard cases (BENCHMARK.md).",
        version: expertParallelVersion,
        subcommands: [RunCommand.self, InfoCommand.self],
        defaultSubcommand: RunCommand.self
    )
}
