// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "ExpertParallel",
    products: [
        .library(name: "ExpertParallel", targets: ["ExpertParallel"]),
        .executable(name: "ep-bench", targets: ["ep-bench"]),
        // The C ABI (include/expert_parallel.h) as libexpert_parallel.so, for C and Python callers.
        .library(name: "expert_parallel", type: .dynamic, targets: ["ExpertParallelC"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
    ],
    targets: [
        // Layer 1: core API, validation, routing plans and the host (CPU) backend. No GPU.
        .target(name: "ExpertParallel"),
        // Layer 2: CUDA driver, NVRTC and NCCL opened with dlopen at run time (builds without CUDA).
        // C trampolines for the few NCCL and driver calls that take a struct by value.
        .target(name: "CExpertParallelShim"),
        .target(name: "ExpertParallelCUDA", dependencies: ["CExpertParallelShim"]),
        // Layer 3: CUDA kernel sources (Kernels/*.cu, embedded at build time) and their NVRTC JIT.
        .target(
            name: "ExpertParallelKernels",
            dependencies: ["ExpertParallelCUDA"],
            exclude: ["Kernels"],
            plugins: ["EmbedKernels"]
        ),
        .executableTarget(name: "embed-kernels"),
        .plugin(name: "EmbedKernels", capability: .buildTool(), dependencies: ["embed-kernels"]),
        // Layer 5: the GPU backend (virtual ranks on one GPU).
        .target(
            name: "ExpertParallelGPU",
            dependencies: ["ExpertParallel", "ExpertParallelCUDA", "ExpertParallelKernels", "CExpertParallelShim"]
        ),
        // Layer 6: the C ABI. The header's module lets the Swift side import its declarations.
        .systemLibrary(name: "CExpertParallel", path: "include"),
        .target(
            name: "ExpertParallelC",
            dependencies: ["CExpertParallel", "ExpertParallel", "ExpertParallelCUDA", "ExpertParallelGPU"]
        ),
        // Layer 6: the benchmark command.
        .executableTarget(
            name: "ep-bench",
            dependencies: [
                "ExpertParallel",
                "ExpertParallelCUDA",
                "ExpertParallelKernels",
                "ExpertParallelGPU",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "ExpertParallelTests",
            dependencies: [
                "ExpertParallel",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ]
        ),
        .testTarget(
            name: "ExpertParallelCUDATests",
            // ExpertParallel only as the oracle that GPU helper results are compared with.
            dependencies: ["ExpertParallel", "ExpertParallelCUDA", "ExpertParallelKernels", "CExpertParallelShim"]
        ),
        // ep-bench's command line, parsed in process (its options, bounds and messages).
        .testTarget(
            name: "EPBenchTests",
            dependencies: ["ep-bench", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(
            name: "ExpertParallelGPUTests",
            dependencies: ["ExpertParallel", "ExpertParallelGPU", "ExpertParallelCUDA", "ExpertParallelKernels", "ExpertParallelC", "CExpertParallelShim"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
