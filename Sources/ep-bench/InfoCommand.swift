import ArgumentParser

// Placeholder until the CUDA runtime layer lands; replaced by the real `info` command.
struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Print the device and whether the kernels compile.")
    func run() throws { print("no GPU support in this build") }
}
