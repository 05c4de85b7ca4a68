// Safetensors reading and writing: round trips in F32 and BF16, sharded folders, and clear
// errors (naming the file and tensor) for truncated or malformed files.
import Foundation
import TestSupport
import Weights
import XCTest

final class SafetensorsTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "ember-st-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func sample() -> [(String, [Int], [Float])] {
        var rng = SeededRandom(seed: 3)
        return [("a.weight", [3, 5], rng.normals(15)), ("b.bias", [7], rng.normals(7, scale: 100)),
                ("scalar", [], [3.5]), ("empty", [0, 4], []),
                ("specials", [6], [0, -0.0, .infinity, -.infinity, 1e-40, 65504])]
    }

    func write(_ tensors: [(String, [Int], [Float])], dtype: DType, to path: String) throws {
        var list: [TensorToWrite] = []
        for (n, s, v) in tensors { v.withUnsafeBufferPointer { list.append(TensorToWrite(name: n, shape: s, data: $0)) } }
        try withExtendedLifetime(tensors) { try SafetensorsWriter.write(list, dtype: dtype, to: path) }
    }

    func testF32RoundTripIsExact() throws {
        try write(sample(), dtype: .f32, to: dir + "/x.safetensors")
        let f = try SafetensorsFile(path: dir + "/x.safetensors")
        XCTAssertEqual(f.metadata["format"], "pt")
        for (n, s, v) in sample() {
            XCTAssertEqual(f.tensors[n]?.shape, s)
            XCTAssertEqual(f.tensors[n]?.dtype, .f32)
            XCTAssertEqual(try f.floats(n).map(\.bitPattern), v.map(\.bitPattern), n)
        }
    }

    func testBF16RoundsToNearestEven() throws {
        XCTAssertEqual(floatToBF16(1.0), 0x3F80)
        XCTAssertEqual(floatToBF16(Float(bitPattern: 0x3F80_8000)), 0x3F80)   // tie -> even
        XCTAssertEqual(floatToBF16(Float(bitPattern: 0x3F81_8000)), 0x3F82)   // tie -> even (up)
        XCTAssertEqual(floatToBF16(Float(bitPattern: 0x3F80_8001)), 0x3F81)   // above tie
        XCTAssertTrue(bf16ToFloat(floatToBF16(.nan)).isNaN)
        XCTAssertEqual(bf16ToFloat(floatToBF16(.infinity)), .infinity)
        try write(sample(), dtype: .bf16, to: dir + "/x.safetensors")
        let f = try SafetensorsFile(path: dir + "/x.safetensors")
        for (n, _, v) in sample() {
            XCTAssertEqual(f.tensors[n]?.dtype, .bf16)
            let got = try f.floats(n)
            for (g, want) in zip(got, v) {
                XCTAssertEqual(g.bitPattern, bf16ToFloat(floatToBF16(want)).bitPattern, n)
                if want.isFinite && abs(want) > 1e-30 { XCTAssertEqual(g, want, accuracy: abs(want) / 128) }
            }
        }
    }

    func testF16Conversion() {
        XCTAssertEqual(f16ToFloat(0x3C00), 1)
        XCTAssertEqual(f16ToFloat(0xC000), -2)
        XCTAssertEqual(f16ToFloat(0x7BFF), 65504)
        XCTAssertEqual(f16ToFloat(0x0001), 0x1p-24)       // smallest subnormal
        XCTAssertEqual(f16ToFloat(0x7C00), .infinity)
        XCTAssertTrue(f16ToFloat(0x7E00).isNaN)
        XCTAssertEqual(f16ToFloat(0x3555), 0.333251953125)
    }

    func testShardedWriteAndRead() throws {
        var list: [TensorToWrite] = []
        let arrays = (0..<6).map { i in [Float](repeating: Float(i), count: 1000) }
        for (i, a) in arrays.enumerated() {
            a.withUnsafeBufferPointer { list.append(TensorToWrite(name: "t\(i)", shape: [10, 100], data: $0)) }
        }
        try withExtendedLifetime(arrays) { try CheckpointWriter.write(list, dtype: .f32, to: dir, maxShardBytes: 9000) }
        let files = try FileManager.default.contentsOfDirectory(atPath: dir)
        XCTAssertTrue(files.contains("model.safetensors.index.json"))
        XCTAssertEqual(files.filter { $0.hasSuffix("-of-00003.safetensors") }.count, 3)
        let reader = try CheckpointReader(directory: dir)
        XCTAssertEqual(reader.tensorNames, (0..<6).map { "t\($0)" })
        var out = [Float](repeating: 0, count: 1000)
        try reader.read("t4", shape: [10, 100], into: &out)
        XCTAssertEqual(out, arrays[4])
        XCTAssertThrowsError(try reader.read("t4", shape: [100, 10], into: &out)) { e in
            XCTAssertEqual(e as? WeightsError, .shapeMismatch(tensor: "t4", expected: [100, 10], found: [10, 100]))
        }
        XCTAssertThrowsError(try reader.read("t9", shape: [10, 100], into: &out)) { e in
            XCTAssertTrue("\(e)".contains("t9"))
        }
    }

    func testIndexNamingAMissingShardOrTensorFails() throws {
        try write(sample(), dtype: .f32, to: dir + "/model-00001-of-00001.safetensors")
        let index: [String: Any] = ["weight_map": ["a.weight": "model-00001-of-00001.safetensors",
                                                   "ghost": "model-00001-of-00001.safetensors"]]
        try JSONSerialization.data(withJSONObject: index).write(to: URL(fileURLWithPath: dir + "/model.safetensors.index.json"))
        XCTAssertThrowsError(try CheckpointReader(directory: dir)) { e in XCTAssertTrue("\(e)".contains("ghost"), "\(e)") }
        let escape: [String: Any] = ["weight_map": ["a.weight": "../elsewhere.safetensors"]]
        try JSONSerialization.data(withJSONObject: escape).write(to: URL(fileURLWithPath: dir + "/model.safetensors.index.json"))
        XCTAssertThrowsError(try CheckpointReader(directory: dir)) { e in XCTAssertTrue("\(e)".contains("leaves the folder"), "\(e)") }
        try FileManager.default.removeItem(atPath: dir + "/model.safetensors.index.json")
        XCTAssertThrowsError(try CheckpointReader(directory: dir))
    }

    /// Every way a file can be broken gives an error, never a crash.
    func testTruncatedAndMalformedFiles() throws {
        let good = dir + "/good.safetensors"
        try write(sample(), dtype: .f32, to: good)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: good))
        let headerLength = Int(bytes.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })

        func expectError(_ data: Data, _ fragment: String, _ label: String) throws {
            let path = dir + "/bad.safetensors"
            try data.write(to: URL(fileURLWithPath: path))
            XCTAssertThrowsError(try SafetensorsFile(path: path), label) { e in
                XCTAssertTrue("\(e)".contains(fragment), "\(label): '\(e)' should mention '\(fragment)'")
            }
            // The same bytes held in memory: the same checks, the error naming the download.
            XCTAssertThrowsError(try SafetensorsFile(block: block(data), name: "downloaded"), label) { e in
                XCTAssertTrue("\(e)".contains(fragment), "\(label) in memory: '\(e)' should mention '\(fragment)'")
                XCTAssertTrue("\(e)".contains("downloaded"), "\(label) in memory: '\(e)' should name the download")
            }
        }
        func block(_ data: Data) -> ByteBlock {
            let b = ByteBlock(adopting: .allocate(byteCount: max(1, data.count), alignment: 64), count: data.count)
            data.copyBytes(to: b.pointer.assumingMemoryBound(to: UInt8.self), count: data.count)
            return b
        }
        // A good file in memory reads as the file does.
        let mapped = try SafetensorsFile(path: good), held = try SafetensorsFile(block: block(bytes), name: "downloaded")
        XCTAssertEqual(mapped.tensors, held.tensors)
        for name in mapped.tensors.keys { XCTAssertEqual(try mapped.floats(name), try held.floats(name), name) }
        try expectError(Data(), "truncated", "empty file")
        try expectError(bytes.prefix(5), "truncated", "shorter than the length")
        try expectError(bytes.prefix(8 + headerLength / 2), "truncated", "cut inside the header")
        try expectError(bytes.prefix(bytes.count - 10), "truncated", "cut inside the data")
        var huge = bytes; huge.replaceSubrange(0..<8, with: withUnsafeBytes(of: UInt64(1 << 62).littleEndian) { Data($0) })
        try expectError(huge, "header", "absurd header length")

        func withHeader(_ json: String, data: Int = 64) -> Data {
            var h = Data(json.utf8)
            while h.count % 8 != 0 { h.append(0x20) }
            var d = withUnsafeBytes(of: UInt64(h.count).littleEndian) { Data($0) }
            d.append(h); d.append(Data(count: data))
            return d
        }
        try expectError(withHeader("{not json"), "JSON", "invalid JSON")
        try expectError(withHeader("[1, 2]"), "object", "array header")
        try expectError(withHeader(#"{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}"#), "w", "unknown dtype")
        try expectError(withHeader(#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#), "w", "size mismatch")
        try expectError(withHeader(#"{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}"#), "w", "negative dim")
        try expectError(withHeader(#"{"w": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}"#), "w", "past the end")
        try expectError(withHeader(#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}"#), "w", "reversed offsets")
        try expectError(withHeader(#"{"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 16]}}"#), "w", "overflowing shape")
        try expectError(withHeader(#"{"w": {"shape": [2], "data_offsets": [0, 8]}}"#), "w", "no dtype")
        try expectError(withHeader(#"{"w": 3}"#), "w", "entry not an object")
        XCTAssertThrowsError(try SafetensorsFile(path: dir + "/does-not-exist.safetensors")) { e in
            XCTAssertTrue("\(e)".contains("does-not-exist"))
        }
    }
}
