import ArgumentParser
import Foundation

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

    /// ArgumentParser's `main`, but for the errors a subcommand's `run()` throws: ArgumentParser
    /// prints a `ValidationError` from there with the root's usage ("Usage: ep-bench
    /// <subcommand>"), as if no subcommand had been named; here it is printed as one from the
    /// subcommand's `validate()` is, with that subcommand's usage (status 64 either way).
    static func main() {
        var command: ParsableCommand
        do { command = try parseAsRoot() } catch { exit(withError: error) }
        do { try command.run() } catch { exit(withError: error, ranBy: type(of: command)) }
    }

    /// Ends the process for `error`, thrown by `command`'s `run()`.
    static func exit(withError error: Error, ranBy command: ParsableCommand.Type) -> Never {
        guard let error = error as? ValidationError else { exit(withError: error) }
        FileHandle.standardError.write(Data((usageErrorText(error.message, command: command) + "\n").utf8))
        Foundation.exit(ExitCode.validationFailure.rawValue)
    }

    /// What ArgumentParser prints for a `validate()` error of `command` (a subcommand of this one,
    /// or this one): the error, the command's usage and where its help is.
    static func usageErrorText(_ message: String, command: ParsableCommand.Type) -> String {
        let names = command == EPBench.self ? _commandName : "\(_commandName) \(command._commandName)"
        let usage = usageString(for: command).replacingOccurrences(of: "\n", with: "\n       ")
        return "Error: \(message)\nUsage: \(usage)\n  See '\(names) --help' for more information."
    }
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
