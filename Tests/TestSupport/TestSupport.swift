// Helpers shared by the test targets: fixture paths, tolerant comparison with a report of the
// worst mismatches, and a seeded random generator.
import Foundation
import XCTest

/// Tests/Fixtures, found from this file's location.
public let fixturesDirectory: String = {
    URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures").path
}()

public func fixtureModel(_ name: String) -> String { fixturesDirectory + "/models/" + name }

/// Result of comparing two arrays: worst absolute difference and how many entries failed.
public struct Comparison {
    public var maxAbsDiff: Float = 0
    public var failures = 0
}

/// Asserts |a − e| <= atol + rtol·|e| element-wise; on failure prints the max difference and the
/// first mismatches. Returns the comparison so callers can report figures.
@discardableResult
public func assertClose(_ actual: [Float], _ expected: [Float], atol: Float = 1e-4, rtol: Float = 1e-4,
                        _ label: String, file: StaticString = #filePath, line: UInt = #line) -> Comparison {
    var cmp = Comparison()
    guard actual.count == expected.count else {
        XCTFail("\(label): \(actual.count) values, expected \(expected.count)", file: file, line: line)
        return cmp
    }
    var firsts: [String] = []
    for i in 0..<actual.count {
        let d = abs(actual[i] - expected[i])
        if !(d <= cmp.maxAbsDiff) || d.isNaN { cmp.maxAbsDiff = d.isNaN ? .nan : max(cmp.maxAbsDiff, d) }
        if !(d <= atol + rtol * abs(expected[i])) {
            cmp.failures += 1
            if firsts.count < 5 { firsts.append("[\(i)] \(actual[i]) vs \(expected[i])") }
        }
    }
    if cmp.failures > 0 {
        XCTFail("\(label): \(cmp.failures)/\(actual.count) outside \(atol) + \(rtol)·|ref|, max |diff| \(cmp.maxAbsDiff); first: \(firsts.joined(separator: ", "))",
                file: file, line: line)
    }
    return cmp
}

/// SplitMix64: small, fast, seeded.
public struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Approximately standard normal (sum of uniforms).
    public mutating func normal() -> Float {
        var s: Float = 0
        for _ in 0..<12 { s += Float.random(in: 0..<1, using: &self) }
        return s - 6
    }
    public mutating func normals(_ n: Int, scale: Float = 1) -> [Float] {
        (0..<n).map { _ in normal() * scale }
    }
}

/// Asserts two arrays are bit-identical; on failure reports the count and the worst difference
/// instead of printing the arrays.
public func assertIdentical(_ a: [Float], _ b: [Float], _ label: String,
                            file: StaticString = #filePath, line: UInt = #line) {
    guard a.count == b.count else {
        return XCTFail("\(label): \(a.count) values vs \(b.count)", file: file, line: line)
    }
    var differing = 0, worst: Float = 0
    for i in 0..<a.count where a[i].bitPattern != b[i].bitPattern {
        differing += 1
        worst = max(worst, abs(a[i] - b[i]))
    }
    if differing > 0 {
        XCTFail("\(label): \(differing)/\(a.count) values differ, max |diff| \(worst)", file: file, line: line)
    }
}

/// Recorded bits of kernel outputs, `Tests/Fixtures/kernel-bits.json`: for each labelled case, a
/// 64-bit FNV-1a digest of its outputs' bit patterns. Every kernel set and thread count gives the
/// same bits (the kernel-set tests), so one record serves every x86-64 machine. On a CPU with both
/// sets the tests compare the sets with each other and with the record; on an AVX2-only CPU, the
/// record is what compares its set with the AVX-512 one. `EMBER_RECORD_KERNEL_BITS=1` writes the
/// digests instead of checking them (only after a kernel change that is meant to change bits).
public enum KernelBits {
    static let path = fixturesDirectory + "/kernel-bits.json"

    public static func digest(_ values: [Float]) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for v in values {
            var bits = v.bitPattern
            for _ in 0..<4 {
                h = (h ^ UInt64(bits & 0xff)) &* 0x0000_0100_0000_01b3
                bits >>= 8
            }
        }
        return String(h, radix: 16) + "/\(values.count)"
    }

    static func load() -> [String: String] {
        guard let data = FileManager.default.contents(atPath: path),
              let record = try? JSONSerialization.jsonObject(with: data) as? [String: String] else { return [:] }
        return record
    }

    public static func check(_ label: String, _ values: [Float], file: StaticString = #filePath, line: UInt = #line) {
        var record = load()
        let got = digest(values)
        if ProcessInfo.processInfo.environment["EMBER_RECORD_KERNEL_BITS"] == "1" {
            record[label] = got
            let data = try! JSONSerialization.data(withJSONObject: record, options: [.prettyPrinted, .sortedKeys])
            FileManager.default.createFile(atPath: path, contents: data)
            return
        }
        guard let want = record[label] else {
            XCTFail("\(label): no recorded bits in \(path) (EMBER_RECORD_KERNEL_BITS=1 records them)", file: file, line: line)
            return
        }
        XCTAssertEqual(got, want, "\(label): the outputs' bits differ from the record", file: file, line: line)
    }
}
