// Every family against PyTorch/transformers golden numbers (scripts/make_fixtures.py): logits of
// a packed batch, the loss, every parameter gradient and a 5-step AdamW trajectory.
import Engine
import Foundation
import Kernels
import Models
import TestSupport
import Weights
import XCTest

final class GoldenTests: XCTestCase {
    static let families = ["llama_gqa", "llama3_tied", "mistral_window", "qwen2_tied", "qwen3_headdim", "gpt2"]

    struct Golden {
        let file: SafetensorsFile
        let batch: PackedBatch
        init(_ dir: String) throws {
            file = try SafetensorsFile(path: dir + "/golden.safetensors")
            let tokens = try file.integers("tokens").map { Int32($0) }
            var seqs: [[Int32]] = [], start = 0
            for n in try file.integers("seq_lens") { seqs.append(Array(tokens[start..<(start + n)])); start += n }
            batch = PackedBatch(seqs)
        }
    }

    override func setUp() { Compute.setThreads(2) }

    func testLogitsMatchTransformers() throws {
        for name in Self.families + ["qwen2_tied_bf16"] {
            let dir = fixtureModel(name)
            let model = try TransformerModel.load(directory: dir)
            let golden = try Golden(dir)
            let b = golden.batch
            let logits = try model.logits(tokens: b.tokens, positions: b.positions,
                                          context: .packed(sequenceStarts: b.sequenceStarts),
                                          rows: Array(0..<b.tokens.count))
            let cmp = assertClose(logits, try golden.file.floats("logits"), name + " logits")
            print("\(name): logits max |diff| vs transformers \(cmp.maxAbsDiff)")
        }
    }

    func testShardedCheckpointLoadsTheSameWeights() throws {
        let model = try TransformerModel.load(directory: fixtureModel("llama_gqa_sharded"))
        let golden = try Golden(fixtureModel("llama_gqa"))
        let b = golden.batch
        let logits = try model.logits(tokens: b.tokens, positions: b.positions,
                                      context: .packed(sequenceStarts: b.sequenceStarts), rows: Array(0..<b.tokens.count))
        assertClose(logits, try golden.file.floats("logits"), "sharded logits")
    }

    func testLossAndEveryGradientMatchTransformers() throws {
        for name in Self.families {
            let dir = fixtureModel(name)
            let model = try TransformerModel.load(directory: dir)
            let golden = try Golden(dir)
            let ce = NextTokenCrossEntropy(batch: golden.batch)
            // Small chunks so the chunked head and its gradient accumulation are exercised.
            let result = try Training.accumulateGradients(model: model, batch: golden.batch, outputRows: ce.outputRows,
                                                          chunkRows: 5, loss: ce.function)
            assertClose([Float(result.loss)], try golden.file.floats("loss"), name + " loss")
            var worst: Float = 0
            for b in model.bindings {
                let expected = try golden.file.floats("grad." + b.checkpointName)
                let actual = model.checkpointTensor(b, from: model.parameters.gradients)
                worst = max(worst, assertClose(actual, expected, "\(name) grad \(b.checkpointName)").maxAbsDiff)
            }
            print("\(name): loss \(result.loss), worst gradient max |diff| \(worst)")
        }
    }

    /// Production train_step, not a test-only path: `Trainer.step` with the cross-entropy loss over
    /// every next token (split into micro-batches) leaves transformers' gradients in the model,
    /// and five real steps follow torch's AdamW trajectory.
    func testTrainStepComputesTheGoldenGradientsAndSteps() throws {
        for name in Self.families {
            let dir = fixtureModel(name)
            let golden = try Golden(dir)
            let items = (0..<golden.batch.sequenceCount).map { b -> TrainItem in
                let tokens = Array(golden.batch.tokens[golden.batch.range(b)])
                return TrainItem(tokens: tokens, responseStart: 1, advantages: Array(repeating: 0, count: tokens.count - 1))
            }
            let model = try TransformerModel.load(directory: dir)
            let trainer = Trainer(model: model)
            let m = try trainer.step(items: items, config: LossConfig(mode: .crossEntropy), microBatchTokens: 8, dryRun: true)
            assertClose([Float(m.loss)], try golden.file.floats("loss"), name + " train_step loss")
            for b in model.bindings {
                assertClose(model.checkpointTensor(b, from: model.parameters.gradients), try golden.file.floats("grad." + b.checkpointName),
                            "\(name) train_step grad \(b.checkpointName)")
            }
            XCTAssertEqual(trainer.weightsVersion, 0, "a dry run changes nothing")
            let adam = Trainer(model: model, optimizer: AdamW(settings: AdamWSettings(lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-3,
                                                                                     weightDecay: 0.1, gradClip: 1.0)))
            var losses: [Float] = []
            for _ in 0..<5 { losses.append(Float(try adam.step(items: items, config: LossConfig(mode: .crossEntropy)).loss)) }
            assertClose(losses, try golden.file.floats("adam_losses"), name + " train_step AdamW losses")
            for b in model.bindings {
                assertClose(model.checkpointTensor(b, from: model.parameters.values),
                            try golden.file.floats("final." + b.checkpointName), "\(name) train_step after 5 steps: \(b.checkpointName)")
            }
        }
    }

    func testAdamWTrajectoryMatchesTorch() throws {
        for name in Self.families {
            let dir = fixtureModel(name)
            let model = try TransformerModel.load(directory: dir)
            let golden = try Golden(dir)
            let ce = NextTokenCrossEntropy(batch: golden.batch)
            let adam = AdamW(settings: AdamWSettings(lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-3,
                                                     weightDecay: 0.1, gradClip: 1.0))
            var losses: [Float] = []
            for _ in 0..<5 {
                let r = try Training.accumulateGradients(model: model, batch: golden.batch,
                                                         outputRows: ce.outputRows, loss: ce.function)
                losses.append(Float(r.loss))
                try adam.step(model.parameters)
            }
            assertClose(losses, try golden.file.floats("adam_losses"), name + " AdamW losses")
            for b in model.bindings {
                assertClose(model.checkpointTensor(b, from: model.parameters.values),
                            try golden.file.floats("final." + b.checkpointName), "\(name) after 5 steps: \(b.checkpointName)")
            }
            print("\(name): AdamW losses \(losses)")
        }
    }
}

/// A whole forward and backward gives the same logits, loss and every gradient bit for bit under
/// the AVX2 and AVX-512 kernel sets and on one or two threads, and the recorded bits
/// (`KernelBits`) on a CPU that has only one of the sets.
final class KernelSetModelTests: XCTestCase {
    override func tearDown() {
        try? KernelSet.use(KernelSet.best!)
        Compute.setThreads(2)
    }

    func testForwardAndBackwardAreBitIdenticalAcrossSetsAndThreads() throws {
        for name in ["llama_gqa", "qwen3_headdim", "gpt2", "mistral_window"] {
            let dir = fixtureModel(name)
            let golden = try GoldenTests.Golden(dir)
            let b = golden.batch
            var first: [Float]? = nil
            for set in KernelSet.supported {
                try KernelSet.use(set)
                for threads in [1, 2] {
                    Compute.setThreads(threads)
                    let model = try TransformerModel.load(directory: dir)
                    let logits = try model.logits(tokens: b.tokens, positions: b.positions,
                                                  context: .packed(sequenceStarts: b.sequenceStarts), rows: Array(0..<b.tokens.count))
                    let ce = NextTokenCrossEntropy(batch: b)
                    let r = try Training.accumulateGradients(model: model, batch: b, outputRows: ce.outputRows,
                                                             chunkRows: 5, loss: ce.function)
                    let grads = Array(UnsafeBufferPointer(start: model.parameters.gradients, count: model.parameters.count))
                    let all = logits + [Float(r.loss)] + grads
                    if let first {
                        XCTAssertTrue(zip(first, all).allSatisfy { $0.bitPattern == $1.bitPattern },
                                      "\(name): \(set.rawValue) with \(threads) threads differs")
                    } else {
                        first = all
                    }
                }
            }
            KernelBits.check("model \(name): logits, loss, gradients", first!)
        }
    }
}

/// `--weights-dtype bf16`: every weight rounded to bfloat16, decode panels stored in bf16, a
/// float32 master for training.
final class BF16WeightsTests: XCTestCase {
    override func setUp() { Compute.setThreads(2) }

    /// Logits of qwen2_tied held in bf16 against transformers' float32 logits of the same
    /// bf16-rounded checkpoint (`qwen2_tied_bf16`, scripts/make_fixtures.py): both compute in
    /// float32, so the float32 tolerance applies; and far from the unrounded model's logits.
    func testLogitsMatchTransformersOnBF16RoundedWeights() throws {
        let model = try TransformerModel.load(directory: fixtureModel("qwen2_tied"))
        model.parameters.useBF16(keepMaster: false)
        XCTAssertNil(model.parameters.master)
        let golden = try GoldenTests.Golden(fixtureModel("qwen2_tied_bf16"))
        let b = golden.batch
        let logits = try model.logits(tokens: b.tokens, positions: b.positions,
                                      context: .packed(sequenceStarts: b.sequenceStarts), rows: Array(0..<b.tokens.count))
        let cmp = assertClose(logits, try golden.file.floats("logits"), "bf16 logits")
        let unrounded = try GoldenTests.Golden(fixtureModel("qwen2_tied")).file.floats("logits")
        let moved = zip(logits, unrounded).map { abs($0 - $1) }.max()!
        print("bf16 storage: logits max |diff| vs transformers \(cmp.maxAbsDiff); vs the float32 model \(moved)")
        XCTAssertGreaterThan(moved, 20 * max(cmp.maxAbsDiff, 1e-6), "rounding to bf16 should move the logits")
    }

    /// A bf16-stored model is, bit for bit, the float32 model whose weights were rounded: logits,
    /// KV-cache decoding through the bf16 panels, and every gradient.
    func testBF16StorageIsTheRoundedFloat32ModelBitForBit() throws {
        for name in ["llama_gqa", "qwen2_tied", "gpt2"] {
            let dir = fixtureModel(name)
            let bf = try TransformerModel.load(directory: dir)
            bf.parameters.useBF16(keepMaster: true)
            let rounded = try TransformerModel.load(directory: dir)
            for i in 0..<rounded.parameters.count { rounded.parameters.values[i] = roundedToBF16(rounded.parameters.values[i]) }
            rounded.parameters.markModified()
            XCTAssertTrue((0..<bf.parameters.count).allSatisfy { bf.parameters.values[$0].bitPattern == rounded.parameters.values[$0].bitPattern })
            let b = try GoldenTests.Golden(dir).batch
            func run(_ m: TransformerModel, packed: Bool) throws -> [Float] {
                m.cachesPackedWeights = packed
                let logits = try m.logits(tokens: b.tokens, positions: b.positions,
                                          context: .packed(sequenceStarts: b.sequenceStarts), rows: Array(0..<b.tokens.count))
                m.parameters.zeroGradients()
                let ce = NextTokenCrossEntropy(batch: b)
                let r = try Training.accumulateGradients(model: m, batch: b, outputRows: ce.outputRows, chunkRows: 5, loss: ce.function)
                return logits + [Float(r.loss)] + Array(UnsafeBufferPointer(start: m.parameters.gradients, count: m.parameters.count))
            }
            for packed in [false, true] {
                let x = try run(bf, packed: packed), y = try run(rounded, packed: packed)
                XCTAssertTrue(zip(x, y).allSatisfy { $0.bitPattern == $1.bitPattern }, "\(name) packed \(packed)")
            }
        }
    }

    /// AdamW on bf16 storage steps the float32 master exactly as it steps a float32 model, and the
    /// values are the master rounded; a checkpoint saves the master.
    func testOptimizerStepsTheMasterAndRoundsTheValues() throws {
        let dir = fixtureModel("llama_gqa")
        let bf = try TransformerModel.load(directory: dir), f32 = try TransformerModel.load(directory: dir)
        bf.parameters.useBF16(keepMaster: true)
        let n = bf.parameters.count
        var rng = SeededRandom(seed: 3)
        let settings = AdamWSettings(lr: 1e-2, weightDecay: 0.01, gradClip: 1.0)
        let a = AdamW(settings: settings), c = AdamW(settings: settings)
        for _ in 0..<3 {
            let g = rng.normals(n, scale: 0.1)
            g.withUnsafeBufferPointer { bf.parameters.gradients.update(from: $0.baseAddress!, count: n); f32.parameters.gradients.update(from: $0.baseAddress!, count: n) }
            try a.step(bf.parameters)
            try c.step(f32.parameters)
        }
        let master = bf.parameters.master!
        XCTAssertTrue((0..<n).allSatisfy { master[$0].bitPattern == f32.parameters.values[$0].bitPattern }, "master = float32 trajectory")
        XCTAssertTrue((0..<n).allSatisfy { bf.parameters.values[$0].bitPattern == roundedToBF16(master[$0]).bitPattern }, "values = bf16(master)")
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("bf16-save-\(getpid())").path
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: out) }
        try bf.save(to: out)
        let back = try TransformerModel.load(directory: out)
        XCTAssertTrue((0..<n).allSatisfy { back.parameters.values[$0].bitPattern == master[$0].bitPattern }, "the checkpoint holds the master")
    }
}
