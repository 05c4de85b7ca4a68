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
