import Foundation
import PackagePlugin

/// Embeds the target's `Kernels/*.cu` and `Kernels/*.cuh` files into it as Swift string
/// constants (see the embed-kernels tool). The folder is excluded from the target's
/// sources; new files are picked up on the next build.
@main
struct EmbedKernels: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let kernels = target.directoryURL.appending(path: "Kernels")
        let names = try FileManager.default.contentsOfDirectory(atPath: kernels.path)
            .filter { $0.hasSuffix(".cu") || $0.hasSuffix(".cuh") }
            .sorted()
        let inputs = names.map { kernels.appending(path: $0) }
        let output = context.pluginWorkDirectoryURL.appending(path: "EmbeddedKernels.swift")
        return [
            .buildCommand(
                displayName: "Embedding \(inputs.count) CUDA sources into \(target.name)",
                executable: try context.tool(named: "embed-kernels").url,
                arguments: [output.path] + inputs.map(\.path),
                inputFiles: inputs,
                outputFiles: [output])
        ]
    }
}
