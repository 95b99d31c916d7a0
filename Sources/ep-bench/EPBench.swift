import ArgumentParser

@main
struct EPBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ep-bench",
        abstract: "Benchmarks ExpertParallel dispatch and combine on the standard cases (docs/ep-bench.md).",
        discussion: exitStatusText,
        version: expertParallelVersion,
        subcommands: [RunCommand.self, InfoCommand.self, PlotCommand.self],
        defaultSubcommand: RunCommand.self
    )
}

/// What `ep-bench`'s exit status means (its `--help`, and README's ep-bench paragraph).
let exitStatusText = """
    Exit status:
      0   every case ran and matched the CPU oracle (info: every kernel compiled)
      1   a case failed: a library, driver or device error, results that differ
          from the CPU oracle, a failed NCCL rank or drill, or the --json or
          --plot file could not be written at the end (info: a kernel did not
          compile)
      64  usage: an unknown option or case, an option value out of range,
          options that do not fit together (an LL layout with an HT case) or
          an option the run would ignore (--sms without a GPU; the message
          names the option, the value and the bound, the values allowed or
          what it applies to), or a --json, --plot or --out path that cannot
          be written (checked before anything runs); plot: a --json or
          --baseline file that cannot be read or is not of that format
    A Swift runtime trap (a signal) is a bug: please report it.
    """
