// Which OpenBLAS kernels run the GEMMs Ember leaves to it (the backward's weight and input
// gradients). OpenBLAS picks a kernel set per CPU model when the library loads. Debian's 0.3.21
// does not know recent CPUs and falls back to an old set: on an Intel Xeon with AVX-512 it
// chose "Prescott" (SSE3), 41 GFLOP/s on a 2048³ sgemm where its Haswell set reaches 154
// (docs/benchmarks.md). The choice can only be made before the library loads, through
// OPENBLAS_CORETYPE, so `ember-server` and `ember-bench` start again with it set when the
// chosen set lacks AVX2 but the CPU has AVX2 and FMA. Haswell's set is the one chosen: the
// most exercised of OpenBLAS's x86-64 kernels. A user's own OPENBLAS_CORETYPE is never replaced.
import COpenBLAS
import Foundation

public enum BLASCore {
    /// The kernel set OpenBLAS chose (its own name for it, e.g. "Haswell", "Prescott").
    public static var name: String { String(cString: openblas_get_corename()) }

    /// Kernel sets with AVX2 and FMA (or wider).
    public static let modern: Set<String> = ["Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"]

    /// Whether the CPU has AVX2 and FMA (`/proc/cpuinfo` flags; false where that file is absent).
    public static var cpuHasAVX2FMA: Bool {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else { return false }
        let flags = Set(line.split(separator: " ").map(String.init))
        return flags.contains("avx2") && flags.contains("fma")
    }

    /// The OPENBLAS_CORETYPE to restart with, or nil when OpenBLAS's own choice stands.
    public static func betterCoreType(environment: [String: String] = ProcessInfo.processInfo.environment) -> String? {
        guard environment["OPENBLAS_CORETYPE"] == nil, environment["EMBER_KEEP_OPENBLAS_CORE"] == nil else { return nil }
        guard !modern.contains(name), cpuHasAVX2FMA else { return nil }
        return "Haswell"
    }

    /// Replaces the process with itself, same arguments, OpenBLAS told to use `coreType`.
    /// Returns only if the restart failed (the process then goes on with OpenBLAS's own choice).
    public static func restart(withCoreType coreType: String) {
        setenv("OPENBLAS_CORETYPE", coreType, 1)
        var args = CommandLine.arguments.map { strdup($0) }
        args.append(nil)
        execv("/proc/self/exe", &args)
        unsetenv("OPENBLAS_CORETYPE")
    }

    /// Restarts with a better kernel set when OpenBLAS fell back to an old one; otherwise returns.
    public static func restartIfMisdetected() {
        if let better = betterCoreType() { restart(withCoreType: better) }
    }
}
