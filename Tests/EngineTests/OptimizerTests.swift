// AdamW against a direct transcription of torch.optim.AdamW, grad-norm clipping, and the
// non-finite guard: a refused step leaves weights and moments bit-identical.
import Engine
import Foundation
import Kernels
import Models
import TestSupport
import Weights
import XCTest

final class OptimizerTests: XCTestCase {
    func store(_ values: [Float]) -> ParameterStore {
        var layout = ParameterLayout()
        layout.add("w", [values.count])
        let s = ParameterStore(layout: layout)
        s.values.update(from: values, count: values.count)
        return s
    }

    func testAdamWMatchesTheTorchFormulaWithClipping() throws {
        var rng = SeededRandom(seed: 9)
        let p0 = rng.normals(37), grads = (0..<3).map { _ in rng.normals(37, scale: 3) }
        let s = store(p0)
        let settings = AdamWSettings(lr: 0.05, beta1: 0.8, beta2: 0.9, eps: 1e-6, weightDecay: 0.3, gradClip: 2.0)
        let adam = AdamW(settings: settings)
        // Reference in Double, step by step as torch does it.
        var p = p0.map(Double.init), m = [Double](repeating: 0, count: 37), v = m
        for (t, g) in grads.enumerated() {
            s.gradients.update(from: g, count: 37)
            let norm = try adam.step(s)
            let refNorm = g.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
            XCTAssertEqual(norm, refNorm, accuracy: 1e-9 * refNorm)
            let coef = min(1.0, 2.0 / (refNorm + 1e-6))
            let step = Double(t + 1)
            for i in 0..<37 {
                let gi = Double(g[i]) * coef
                p[i] *= 1 - 0.05 * 0.3
                m[i] = 0.8 * m[i] + 0.2 * gi
                v[i] = 0.9 * v[i] + 0.1 * gi * gi
                let denom = (v[i] / (1 - pow(0.9, step))).squareRoot() + 1e-6
                p[i] -= 0.05 / (1 - pow(0.8, step)) * m[i] / denom
            }
        }
        assertClose(Array(UnsafeBufferPointer(start: s.values, count: 37)), p.map(Float.init), atol: 1e-6, rtol: 1e-5, "AdamW")
        XCTAssertEqual(adam.stepCount, 3)
    }

    func testNonFiniteGradientIsRefusedAndNothingChanges() throws {
        for bad in [Float.nan, .infinity, -.infinity] {
            var rng = SeededRandom(seed: 5)
            let s = store(rng.normals(1000))
            let adam = AdamW(settings: AdamWSettings(lr: 0.1))
            s.gradients.update(from: rng.normals(1000), count: 1000)
            try adam.step(s)
            let before = s.checksum()
            let m = Array(UnsafeBufferPointer(start: s.firstMoment, count: 1000))
            let v = Array(UnsafeBufferPointer(start: s.secondMoment, count: 1000))
            s.gradients.update(from: rng.normals(1000), count: 1000)
            s.gradients[617] = bad
            XCTAssertThrowsError(try adam.step(s)) { e in XCTAssertTrue(e is NonFiniteError) }
            XCTAssertEqual(s.checksum(), before)
            XCTAssertEqual(Array(UnsafeBufferPointer(start: s.firstMoment, count: 1000)).map(\.bitPattern), m.map(\.bitPattern))
            XCTAssertEqual(Array(UnsafeBufferPointer(start: s.secondMoment, count: 1000)).map(\.bitPattern), v.map(\.bitPattern))
            XCTAssertEqual(adam.stepCount, 1, "a refused step does not count")
        }
    }

    /// NaN injected into one gradient of a real model: the step is refused, the weights'
    /// checksum is unchanged, and the next good step works.
    func testModelStepWithNaNGradientLeavesWeightsUnchanged() throws {
        Compute.setThreads(2)
        let model = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
        let batch = PackedBatch([[1, 5, 9, 3, 7], [2, 4, 6]])
        let ce = NextTokenCrossEntropy(batch: batch)
        let adam = AdamW(settings: AdamWSettings(lr: 1e-2))
        let before = model.parameters.checksum()
        _ = try Training.accumulateGradients(model: model, batch: batch, outputRows: ce.outputRows, loss: ce.function)
        model.parameters.gradients[model.parameters.count / 2] = .nan
        XCTAssertThrowsError(try adam.step(model.parameters))
        XCTAssertEqual(model.parameters.checksum(), before)

        // A loss that returns NaN is refused before the backward pass.
        XCTAssertThrowsError(try Training.accumulateGradients(model: model, batch: batch, outputRows: ce.outputRows) { _ in .nan }) { e in
            XCTAssertEqual((e as? NonFiniteError)?.what, "the loss")
        }
        _ = try Training.accumulateGradients(model: model, batch: batch, outputRows: ce.outputRows, loss: ce.function)
        try adam.step(model.parameters)
        XCTAssertNotEqual(model.parameters.checksum(), before)
    }
}
