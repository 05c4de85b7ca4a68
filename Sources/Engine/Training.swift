// One training forward/backward over a packed batch with a pluggable loss: the engine hands the
// loss each chunk of logits and takes back d(loss)/d(logits), so cross-entropy today and the
// policy losses later plug in without touching the model.
import Foundation
import Kernels
import Models
import Weights

/// Variable-length sequences concatenated without padding.
public struct PackedBatch: Sendable {
    public let tokens: [Int32]
    /// B+1 offsets: sequence b is tokens[sequenceStarts[b]..<sequenceStarts[b+1]].
    public let sequenceStarts: [Int]
    /// Position of each token within its sequence.
    public let positions: [Int32]

    public init(_ sequences: [[Int32]]) {
        var tokens: [Int32] = [], starts = [0], positions: [Int32] = []
        for s in sequences {
            tokens += s
            positions += (0..<s.count).map { Int32($0) }
            starts.append(tokens.count)
        }
        self.tokens = tokens; sequenceStarts = starts; self.positions = positions
    }

    public var sequenceCount: Int { sequenceStarts.count - 1 }
    public func range(_ b: Int) -> Range<Int> { sequenceStarts[b]..<sequenceStarts[b + 1] }
}

/// A chunk of logits handed to a loss: row i holds the next-token logits of batch token
/// `outputRows[rows.lowerBound + i]`. The loss overwrites `logits` with d(loss)/d(logits).
public struct LogitsChunk {
    public let rows: Range<Int>
    public let logits: UnsafeMutablePointer<Float>
    public let vocabSize: Int
}

/// A loss over logits chunks; returns the chunk's contribution to the total loss.
public typealias LossFunction = (LogitsChunk) throws -> Double

/// Result of a forward/backward pass.
public struct GradientResult: Sendable {
    public let loss: Double
    public let tokens: Int
}

public enum Training {
    /// Adds d(loss)/d(parameters) into the model's gradient buffer (zeroing it first when
    /// `zeroGradients`) for `loss` evaluated on the logits of `outputRows` (token indices of
    /// `batch` whose next-token distribution the loss uses). `activations`, when given, are a
    /// saved forward of this very batch on the current weights (the trainer keeps the one it
    /// took for the loss plan). Every gradient `train_step` computes goes through here.
    /// With `adapter`, the base is frozen and the gradients are the adapter's.
    public static func accumulateGradients(model: TransformerModel, batch: PackedBatch, outputRows: [Int],
                                           chunkRows: Int? = nil, zeroGradients: Bool = true, activations: Activations? = nil,
                                           adapter: LoRAAdapter? = nil, loss: LossFunction) throws -> GradientResult {
        // Dozens of parallel regions back to back: workers spin between them (Compute.spinning).
        try Compute.spinning {
            if zeroGradients { (adapter?.parameters ?? model.parameters).zeroGradients() }
            let acts = try activations ?? model.forward(tokens: batch.tokens, positions: batch.positions,
                                                        context: .packed(sequenceStarts: batch.sequenceStarts), saving: true,
                                                        adapters: adapter.map { AdapterRows($0, tokens: batch.tokens.count) })
            let C = model.architecture.hiddenSize
            let dHidden = FloatBuffer(zeros: batch.tokens.count * C)
            var total = 0.0
            try model.withLogitChunks(hidden: acts.hidden.pointer, rows: outputRows,
                                      chunkRows: chunkRows ?? model.defaultChunkRows(),
                                      dHidden: dHidden.pointer, frozenHead: adapter != nil) { range, logits in
                total += try loss(LogitsChunk(rows: range, logits: logits, vocabSize: model.architecture.vocabSize))
            }
            guard total.isFinite else { throw NonFiniteError(what: "the loss") }
            model.backward(acts, dHidden: dHidden.pointer, adapter: adapter)
            return GradientResult(loss: total, tokens: outputRows.count)
        }
    }
}

/// Mean next-token cross-entropy over every predicted position of a packed batch
/// (supervised warm-up; also the loss of the golden tests).
public struct NextTokenCrossEntropy {
    /// Token indices whose logits are scored (every token but the last of each sequence).
    public let outputRows: [Int]
    /// Target of each output row (the next token).
    public let targets: [Int32]

    public init(batch: PackedBatch) {
        var rows: [Int] = [], targets: [Int32] = []
        for b in 0..<batch.sequenceCount {
            let r = batch.range(b)
            for t in r.lowerBound..<(r.upperBound - 1) {
                rows.append(t)
                targets.append(batch.tokens[t + 1])
            }
        }
        outputRows = rows
        self.targets = targets
    }

    /// The loss function: Σ (lse − logit[target]) / N over the chunk.
    public var function: LossFunction {
        let n = Float(max(1, outputRows.count))
        let targets = self.targets
        return { chunk in
            let count = chunk.rows.count
            let weights = [Float](repeating: 1 / n, count: count)
            return targets.withUnsafeBufferPointer { t in
                weights.withUnsafeBufferPointer { w in
                    crossEntropyForwardBackward(chunk.logits, targets: t.baseAddress! + chunk.rows.lowerBound,
                                                weights: w.baseAddress!, rows: count, vocab: chunk.vocabSize)
                }
            }
        }
    }
}
