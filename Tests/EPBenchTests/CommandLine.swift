import ArgumentParser
@testable import ep_bench

/// What ep-bench answers a command line it refuses: the first line of its message (what follows
/// `Error: `) and its exit status (64: usage).
struct Refusal: CustomStringConvertible {
    var message: String
    var status: Int32
    var description: String { "status \(status): \(message)" }
}

/// Parses `arguments` as `ep-bench` does before anything runs (the options, then every
/// `validate()`); nil when it accepts them.
func refusal(_ arguments: [String]) -> Refusal? {
    do {
        _ = try EPBench.parseAsRoot(arguments)
        return nil
    } catch {
        let message = EPBench.message(for: error).split(separator: "\n").first.map(String.init) ?? ""
        return Refusal(message: message, status: EPBench.exitCode(for: error).rawValue)
    }
}

/// The command `arguments` parse to (they must be accepted).
func parsed<Command: ParsableCommand>(_ arguments: [String], as: Command.Type = Command.self) throws -> Command {
    guard let command = try EPBench.parseAsRoot(arguments) as? Command else {
        throw ValidationError("\(arguments) did not parse to \(Command.self)")
    }
    return command
}

/// The usage status (EX_USAGE), ArgumentParser's for a `ValidationError` and a bad value.
let usageStatus: Int32 = 64
