// Scoring token sequences: per response token, the log-probability under the full softmax at a
// temperature (and optionally entropy, Lp-Reg proxy log-probability, top alternatives), over one
// packed forward pass. Uses `RowDistribution`, as sampling and the training losses do, so the
// three agree bit for bit on the same weights.
import Foundation
import Kernels
import Models

/// A sequence to score: `tokens` = prompt + response, response starting at `responseStart` (>= 1).
public struct ScoredSequence: Sendable {
    public let tokens: [Int32]
    public let responseStart: Int
    public init(tokens: [Int32], responseStart: Int) { self.tokens = tokens; self.responseStart = responseStart }
}

public struct ScoreResult: Sendable {
    public var logprobs: [Float]
    public var entropies: [Float]?
    public var proxyLogprobs: [Float]?
    public var topLogprobs: [[TokenLogprob]]?
    /// Per position, the log-probability of each of `GenerationOptions.probeTokens`, in order.
    public var probeLogprobs: [[Float]]?
}

public enum ScoringError: Error, CustomStringConvertible, Equatable {
    case invalid(path: String, reason: String)
    public var description: String {
        switch self { case let .invalid(p, r): "\(p): \(r)" }
    }
}

public enum Scoring {
    /// Rows of a packed batch whose logits predict response tokens, with their targets.
    public static func responseRows(_ batch: PackedBatch, responseStarts: [Int]) -> (rows: [Int], targets: [Int32]) {
        var rows: [Int] = [], targets: [Int32] = []
        for b in 0..<batch.sequenceCount {
            let r = batch.range(b)
            for t in (r.lowerBound + responseStarts[b] - 1)..<(r.upperBound - 1) {
                rows.append(t)
                targets.append(batch.tokens[t + 1])
            }
        }
        return (rows, targets)
    }

    public static func validate(_ sequences: [ScoredSequence], vocabSize: Int, maxPositions: Int?) throws {
        for (i, s) in sequences.enumerated() {
            guard s.responseStart >= 1, s.responseStart <= s.tokens.count else {
                throw ScoringError.invalid(path: "sequences[\(i)].response_start",
                                           reason: "must be in 1...\(s.tokens.count) (the token count), got \(s.responseStart)")
            }
            if let bad = s.tokens.firstIndex(where: { $0 < 0 || Int($0) >= vocabSize }) {
                throw ScoringError.invalid(path: "sequences[\(i)].tokens[\(bad)]",
                                           reason: "token \(s.tokens[bad]) is outside the vocabulary (0..<\(vocabSize))")
            }
            if let m = maxPositions, s.tokens.count > m {
                throw ScoringError.invalid(path: "sequences[\(i)].tokens", reason: "\(s.tokens.count) tokens exceed the model's \(m) positions")
            }
        }
    }

    /// Scores every sequence in one packed forward pass. Temperature 0 reports at temperature 1.
    /// `adapters`, when given, holds each sequence's LoRA adapter (nil: the base).
    public static func score(model: TransformerModel, sequences: [ScoredSequence], temperature: Float = 1,
                             options: GenerationOptions = GenerationOptions(),
                             adapters: [LoRAAdapter?]? = nil) throws -> [ScoreResult] {
        let a = model.architecture
        try validate(sequences, vocabSize: a.vocabSize, maxPositions: a.position == .learned ? a.maxPositions : nil)
        guard temperature >= 0, temperature.isFinite else {
            throw ScoringError.invalid(path: "temperature", reason: "must be a finite number >= 0")
        }
        if sequences.isEmpty { return [] }
        let batch = PackedBatch(sequences.map { $0.tokens })
        let (rows, targets) = responseRows(batch, responseStarts: sequences.map { $0.responseStart })
        var results = sequences.map { s in
            ScoreResult(logprobs: [], entropies: options.entropy ? [] : nil, proxyLogprobs: options.proxy != nil ? [] : nil,
                        topLogprobs: options.topLogprobs > 0 ? [] : nil, probeLogprobs: options.probeTokens.isEmpty ? nil : [])
        }
        // Owner sequence of each output row, in order.
        var owner: [Int] = []
        for (b, s) in sequences.enumerated() { owner += Array(repeating: b, count: s.tokens.count - s.responseStart) }
        if rows.isEmpty { return results }
        let rowAdapters = adapters.flatMap { list in
            AdapterRows(perToken: zip(sequences, list).flatMap { s, a in Array(repeating: a, count: s.tokens.count) })
        }
        try Compute.spinning {
            let acts = try model.forward(tokens: batch.tokens, positions: batch.positions,
                                         context: .packed(sequenceStarts: batch.sequenceStarts), adapters: rowAdapters)
            let V = a.vocabSize
            model.withLogitChunks(hidden: acts.hidden.pointer, rows: rows, chunkRows: model.defaultChunkRows()) { range, logits in
                for (i, r) in range.enumerated() {
                    let dist = RowDistribution(scaling: logits + i * V, count: V, temperature: temperature)
                    let b = owner[r], target = Int(targets[r])
                    results[b].logprobs.append(dist.logprob(target))
                    if options.entropy { results[b].entropies!.append(dist.entropy()) }
                    if let p = options.proxy { results[b].proxyLogprobs!.append(dist.proxyLogprob(target, p)) }
                    if options.topLogprobs > 0 {
                        results[b].topLogprobs!.append(dist.top(options.topLogprobs).map { TokenLogprob(token: $0.token, logprob: $0.logprob) })
                    }
                    if !options.probeTokens.isEmpty {
                        results[b].probeLogprobs!.append(options.probeTokens.map { dist.logprob(Int($0)) })
                    }
                }
            }
        }
        return results
    }
}
