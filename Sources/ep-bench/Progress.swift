import Foundation

/// `[3/12] ht-std ht flat bf16 R=8 B=4096 sms=32` on stderr before each run of a sweep, only when
/// stderr is a terminal (rewritten in place) or `--progress` asks for it (one line each). Never
/// on stdout, so the table and anything piped from it stay clean.
struct Progress {
    let enabled: Bool
    let inPlace: Bool
    let total: Int
    private var done = 0

    init(total: Int, forced: Bool) {
        let terminal = isatty(STDERR_FILENO) == 1
        enabled = terminal || forced
        inPlace = terminal
        self.total = total
    }

    mutating func start(_ what: String) {
        done += 1
        guard enabled else { return }
        let line = "[\(done)/\(total)] \(what)"
        write(inPlace ? "\r\u{1B}[2K" + line : line + "\n")
    }

    /// Clears the line left on a terminal.
    func finish() {
        if enabled && inPlace { write("\r\u{1B}[2K") }
    }

    private func write(_ text: String) { FileHandle.standardError.write(Data(text.utf8)) }
}
