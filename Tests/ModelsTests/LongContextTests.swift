// Precision at long positions and RoPE tables (scripts/make_long_context_fixtures.py):
// - every RoPE table (default, linear, llama3) equals transformers' bit for bit, except where
//   PyTorch's own fp32 power is not correctly rounded (there within two ulps: an ulp of the power, one more after the divisions);
// - for each family, the log-probabilities of a 320-token sequence (twice the llama3 original
//   context and more) stay within 2x of PyTorch fp32's error against a float64 run.
import Engine
import Foundation
import Kernels
import Models
import TestSupport
import XCTest

final class LongContextTests: XCTestCase {
    override func setUp() { Compute.setThreads(2) }

    func testRopeTablesEqualTransformers() throws {
        let data = try Data(contentsOf: URL(fileURLWithPath: fixturesDirectory + "/rope/tables.json"))
        let cases = try JSONSerialization.jsonObject(with: data) as! [[String: Any]]
        XCTAssertGreaterThan(cases.count, 100)
        var exact = 0, nearby = 0
        for c in cases {
            let theta = c["theta"] as! Double, dim = c["head_dim"] as! Int
            var freqs = RopeFrequencies(headDim: dim, theta: theta)
            let label = "theta \(theta) dim \(dim) \(c["rope_scaling"] ?? "default")"
            if let s = c["rope_scaling"] as? [String: Any] {
                let factor = (s["factor"] as! NSNumber).doubleValue
                if s["rope_type"] as? String == "linear" {
                    freqs = freqs.linear(factor: factor)
                } else {
                    freqs = freqs.llama3(factor: factor, lowFreqFactor: (s["low_freq_factor"] as! NSNumber).doubleValue,
                                         highFreqFactor: (s["high_freq_factor"] as! NSNumber).doubleValue,
                                         originalMaxPositions: (s["original_max_position_embeddings"] as! NSNumber).doubleValue)
                }
            }
            let want = (c["inv_freq_bits"] as! [Int]).map { Float(bitPattern: UInt32(bitPattern: Int32($0))) }
            let correctlyRounded = c["pow_correctly_rounded"] as! [Bool]
            XCTAssertEqual(freqs.invFreq.count, want.count, label)
            for (i, (got, ref)) in zip(freqs.invFreq, want).enumerated() {
                if correctlyRounded[i] {
                    XCTAssertEqual(got.bitPattern, ref.bitPattern, "\(label) entry \(i): \(got) vs \(ref)")
                    exact += 1
                } else {
                    XCTAssertLessThanOrEqual(abs(Int64(got.bitPattern) - Int64(ref.bitPattern)), 2, "\(label) entry \(i)")
                    nearby += 1
                }
            }
        }
        print("rope tables: \(exact) entries bit-identical, \(nearby) within two ulps (PyTorch's powf not correctly rounded there)")
        XCTAssertGreaterThan(exact, 20 * nearby)
    }

    func testLongPositionsStayWithinTwiceFp32Error() throws {
        for family in ["llama", "llama3", "mistral", "qwen2", "qwen3", "gpt2"] {
            let dir = fixturesDirectory + "/long_context/" + family
            let golden = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/long.json"))) as! [String: Any]
            let tokens = (golden["tokens"] as! [Int]).map(Int32.init)
            let f64 = golden["logprobs_f64"] as! [Double], f32 = golden["logprobs_f32"] as! [Double]
            let model = try TransformerModel.load(directory: dir)
            let ours = try Scoring.score(model: model, sequences: [ScoredSequence(tokens: tokens, responseStart: 1)])[0].logprobs
            XCTAssertEqual(ours.count, f64.count)
            let emberError = zip(ours, f64).map { abs(Double($0) - $1) }
            let torchError = zip(f32, f64).map { abs($0 - $1) }
            // Over the whole sequence and over its far half (positions >= 2x the llama3 original context).
            for (range, what) in [(0..<emberError.count, "all positions"), (255..<emberError.count, "positions >= 256")] {
                let e = emberError[range].max()!, t = torchError[range].max()!
                print("\(family) \(what): Ember max |error| vs float64 \(e), PyTorch fp32 \(t) (\(String(format: "%.2f", e / t))x)")
                XCTAssertLessThanOrEqual(e, 2 * t, "\(family) \(what)")
            }
        }
    }
}
