/// A compilable kernel source: one `.cu` file from `Kernels/` with every shared `.cuh`
/// helper file in front of it, exactly the text NVRTC sees.
///
/// `#line` markers keep compiler messages pointing at the original file and line.
public struct KernelSource: Hashable, Sendable {
    /// The `.cu` file's name without extension, e.g. `ep_copy`.
    public let name: String
    /// The complete program text.
    public let text: String

    /// Wraps a complete, self-contained program (tests, ad-hoc kernels).
    public init(name: String, completeText: String) {
        self.name = name
        self.text = completeText
    }

    /// A kernel body that uses the shared helpers: the helpers are prepended.
    public init(name: String, body: String) {
        self.init(name: name, completeText: Self.prelude + Self.marked("\(name).cu", body))
    }

    /// Every embedded `.cu` file, in name order: what `ep-bench info` and CI compile.
    public static let all: [KernelSource] = embeddedKernelFiles
        .filter { $0.name.hasSuffix(".cu") }
        .map { KernelSource(name: String($0.name.dropLast(3)), body: $0.text) }

    /// The embedded kernel file `name` (without `.cu`), or nil.
    public static func named(_ name: String) -> KernelSource? {
        all.first { $0.name == name }
    }

    /// The embedded kernel file `name`; the name is a compile-time fact, so a missing one is a bug.
    public static func embedded(_ name: String) -> KernelSource {
        guard let source = named(name) else {
            preconditionFailure("no embedded kernel \(name).cu; have \(all.map(\.name))")
        }
        return source
    }

    /// `ep_copy.cu`: the grid-stride byte copy `ep_copy_bytes`.
    public static var copy: KernelSource { embedded("ep_copy") }

    /// The shared helper files (`*.cuh`), concatenated in name order.
    public static let prelude: String = embeddedKernelFiles
        .filter { $0.name.hasSuffix(".cuh") }
        .map { marked($0.name, $0.text) }
        .joined()

    private static func marked(_ fileName: String, _ text: String) -> String {
        "#line 1 \"\(fileName)\"\n" + text + (text.hasSuffix("\n") ? "" : "\n")
    }
}
