// swift-tools-version:6.0
import Foundation
import PackageDescription

/// Release builds of the numeric code skip bounds checks inside kernels (they take unsafe
/// pointers already) and exclusivity checks on hot loops. Everything builds for baseline x86-64;
/// the hot kernels (Sources/CKernels) are compiled twice, for AVX2 + FMA and for AVX-512, and
/// chosen at start-up from CPUID.
let fastMath: [SwiftSetting] = [
    .unsafeFlags(["-Ounchecked", "-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]

let package = Package(
    name: "Ember",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "ember-server", targets: ["ember-server"]),
        .executable(name: "ember-bench", targets: ["ember-bench"]),
        .executable(name: "ember", targets: ["ember"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // MARK: - System libraries (Debian -dev packages; scripts/setup installs them)
        .systemLibrary(name: "COpenBLAS", pkgConfig: "openblas",
                       providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CLibUV", pkgConfig: "libuv", providers: [.apt(["libuv1-dev"])]),
        .systemLibrary(name: "CCurl", pkgConfig: "libcurl",
                       providers: [.apt(["libcurl4-openssl-dev"])]),
        .systemLibrary(name: "CHTTPParser", providers: [.apt(["libhttp-parser-dev"])]),
        .systemLibrary(name: "CCrypto", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),

        // MARK: - Layers (each depends only on the ones above it)
        // The kernel sets: C with clang vector extensions, no contraction of a·b + c (every fused
        // multiply-add is written out), always optimised (debug builds run the tests too).
        .target(name: "CKernels", cSettings: [.unsafeFlags(["-O3", "-ffp-contract=off", "-Wno-psabi"])]),
        .target(name: "Kernels", dependencies: ["COpenBLAS", "CKernels"], swiftSettings: fastMath),
        .target(name: "Weights", dependencies: ["Kernels", "CKernels"], swiftSettings: fastMath),
        .target(name: "Models", dependencies: ["Kernels", "Weights"], swiftSettings: fastMath),
        .target(name: "Tokenizer", swiftSettings: fastMath),
        .target(name: "JSON", swiftSettings: fastMath),
        .target(name: "Chat", dependencies: ["JSON"]),
        .target(name: "Engine", dependencies: ["Kernels", "Weights", "Models", "Tokenizer"],
                swiftSettings: fastMath),

        // Open MPI for data-parallel training, loaded at run time only under mpirun (no link-time
        // dependency: a server started alone never touches it).
        .target(name: "CMPI", linkerSettings: [.linkedLibrary("dl")]),
        .target(name: "Ranks", dependencies: ["CMPI", "Engine", "Kernels", "Models", "Weights"], swiftSettings: fastMath),

        .target(name: "RPC", dependencies: ["Engine", "Ranks", "Models", "Kernels", "Tokenizer", "Weights", "Chat", "JSON"], swiftSettings: fastMath),
        .target(name: "Server", dependencies: ["RPC", "Engine", "Models", "Kernels", "Weights", "Chat", "JSON", "CHTTPParser", "CLibUV", "CCurl", "CCrypto",
                                               .product(name: "Logging", package: "swift-log")],
                swiftSettings: fastMath),

        // MARK: - Executables
        .executableTarget(name: "ember-server", dependencies: ["Server", "RPC", "Models", "Kernels", "Tokenizer", "Weights",
                                                          .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                                          .product(name: "Logging", package: "swift-log")],
                          swiftSettings: fastMath),
        .executableTarget(name: "ember", dependencies: ["CCurl", .product(name: "ArgumentParser", package: "swift-argument-parser")]),
        .executableTarget(name: "ember-bench", dependencies: ["Engine", "Models", "Kernels", "Tokenizer", "RPC", "Chat", "Ranks"],
                          path: "bench/Sources/ember-bench", swiftSettings: fastMath),

        // MARK: - Tests
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "KernelsTests", dependencies: ["Kernels", "TestSupport"]),
        .testTarget(name: "WeightsTests", dependencies: ["Weights", "TestSupport"]),
        .testTarget(name: "ModelsTests", dependencies: ["Models", "Engine", "TestSupport"]),
        .testTarget(name: "TokenizerTests", dependencies: ["Tokenizer", "TestSupport"]),
        .testTarget(name: "ChatTests", dependencies: ["Chat", "Tokenizer", "TestSupport"]),
        .testTarget(name: "ServerTests", dependencies: ["Server", "RPC", "Engine", "Models", "Tokenizer", "Kernels", "TestSupport"]),
        .testTarget(name: "RPCTests", dependencies: ["RPC", "JSON", "Engine", "Models", "Tokenizer", "Weights", "Chat", "TestSupport"]),
        .testTarget(name: "EngineTests", dependencies: ["Engine", "Models", "Tokenizer", "TestSupport"]),
    ]
)

// libFuzzer harnesses (fuzz/): only with EMBER_FUZZ=1, which scripts/fuzz sets when it builds
// them with -sanitize=fuzzer,address (they call libFuzzer's driver, absent from normal builds).
if ProcessInfo.processInfo.environment["EMBER_FUZZ"] != nil {
    for (name, deps) in [("http", ["Server"]), ("jsonrpc", ["RPC", "Models", "Kernels"]), ("safetensors", ["Weights"]),
                         ("tokenizer", ["Tokenizer"])] {
        package.targets.append(.executableTarget(name: "fuzz-\(name)", dependencies: deps.map { .target(name: $0) } + ["FuzzCommon"],
                                                 path: "fuzz/\(name)"))
    }
    package.targets.append(.target(name: "FuzzCommon", path: "fuzz/Common"))
}
