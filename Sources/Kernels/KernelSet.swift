// Which of Ember's kernel sets runs: AVX-512 where the CPU has it, AVX2 + FMA otherwise, chosen
// once at start-up from CPUID (Sources/CKernels). Both sets give the same bits for every kernel;
// `EMBER_KERNELS=avx2` forces the narrower set on an AVX-512 machine (tests and benchmarks).
import CKernels
import Foundation

public enum KernelSet: String, CaseIterable, Sendable {
    case avx2, avx512

    /// The set's number in the C dispatch (`ember_kernels_table`).
    public var code: Int32 {
        switch self {
        case .avx2: Int32(EMBER_KERNELS_AVX2)
        case .avx512: Int32(EMBER_KERNELS_AVX512)
        }
    }

    /// The best set this CPU runs, or nil (no AVX2 + FMA: Ember cannot run here).
    public static var best: KernelSet? {
        switch Int(ember_kernel_set_best()) {
        case Int(EMBER_KERNELS_AVX512): .avx512
        case Int(EMBER_KERNELS_AVX2): .avx2
        default: nil
        }
    }

    /// Sets this CPU runs (narrowest first).
    public static var supported: [KernelSet] {
        guard let best else { return [] }
        return best == .avx512 ? [.avx2, .avx512] : [.avx2]
    }

    /// The set in use.
    public static var active: KernelSet { Kernels.activeSet }

    /// Switches every later kernel call to `set` (weights packed for one set serve the other: the
    /// panel layout is shared). Throws when this CPU lacks the set.
    public static func use(_ set: KernelSet) throws {
        guard supported.contains(set) else {
            throw KernelSetError("this CPU cannot run the \(set.rawValue) kernels (it supports: "
                                 + (supported.isEmpty ? "none" : supported.map(\.rawValue).joined(separator: ", ")) + ")")
        }
        Kernels.activeSet = set
        Kernels.table = ember_kernels_table(set.code)!
    }

    /// Applies EMBER_KERNELS from the environment (avx2 | avx512), if set. Returns an error message
    /// for a value this CPU cannot run; nil when all is well.
    public static func applyEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment) -> String? {
        guard let name = environment["EMBER_KERNELS"], !name.isEmpty else { return nil }
        guard let set = KernelSet(rawValue: name.lowercased()) else {
            return "EMBER_KERNELS=\(name): unknown kernel set (use one of: \(allCases.map(\.rawValue).joined(separator: ", ")))"
        }
        do { try use(set) } catch { return "EMBER_KERNELS=\(name): \(error)" }
        return nil
    }
}

public struct KernelSetError: Error, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}

/// The active table. Reading it is one load; it changes only through `KernelSet.use`.
enum Kernels {
    /// The best set, or the one EMBER_KERNELS names when this CPU runs it (a bad value is
    /// reported by `KernelSet.applyEnvironment`, which the executables call at start-up).
    nonisolated(unsafe) static var activeSet: KernelSet = {
        guard let best = KernelSet.best else {
            FileHandle.standardError.write(Data("ember: this CPU lacks AVX2 and FMA, which Ember's kernels need (x86-64-v3 or newer)\n".utf8))
            exit(70)
        }
        if let name = ProcessInfo.processInfo.environment["EMBER_KERNELS"], let set = KernelSet(rawValue: name.lowercased()),
           KernelSet.supported.contains(set) {
            return set
        }
        return best
    }()
    nonisolated(unsafe) static var table: UnsafePointer<ember_kernels> = ember_kernels_table(activeSet.code)!
}
