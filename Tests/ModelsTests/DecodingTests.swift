// Incremental decoding with a KV cache equals recomputing from scratch, and a packed batch
// equals each sequence alone — bit for bit, since every kernel reduces each row in a fixed order.
import Engine
import Foundation
import Kernels
import Models
import TestSupport
import XCTest

final class DecodingTests: XCTestCase {
    static let families = ["llama_gqa", "llama3_tied", "mistral_window", "qwen2_tied", "qwen3_headdim", "gpt2"]

    func sequences(vocab: Int, lengths: [Int], seed: UInt64) -> [[Int32]] {
        var rng = SeededRandom(seed: seed)
        return lengths.map { n in (0..<n).map { _ in Int32.random(in: 0..<Int32(vocab), using: &rng) } }
    }

    func fullLogits(_ model: TransformerModel, _ seq: [Int32]) throws -> [Float] {
        try model.logits(tokens: seq, positions: (0..<seq.count).map { Int32($0) },
                         context: .packed(sequenceStarts: [0, seq.count]), rows: Array(0..<seq.count))
    }

    /// Three sequences of different lengths decode together: each prefills a prompt into its own
    /// slot, then all step one token at a time in one batch. Every step's logits must equal the
    /// full forward's logits at that position exactly.
    func testKVCacheDecodingEqualsFullForward() throws {
        for threads in [1, 2] {
            Compute.setThreads(threads)
            for name in Self.families {
                let model = try TransformerModel.load(directory: fixtureModel(name))
                let V = model.architecture.vocabSize
                let seqs = sequences(vocab: V, lengths: [11, 8, 14], seed: 7)
                let prompts = [3, 5, 1]
                let cache = KVCache(architecture: model.architecture, slots: 3, capacity: 16)
                var worst: Float = 0
                let full = try seqs.map { try fullLogits(model, $0) }

                // Prefill all three prompts in one packed cache-mode batch.
                var tokens: [Int32] = [], positions: [Int32] = [], slots: [Int32] = [], rows: [Int] = []
                for (s, seq) in seqs.enumerated() {
                    for p in 0..<prompts[s] {
                        tokens.append(seq[p]); positions.append(Int32(p)); slots.append(Int32(s))
                    }
                    rows.append(tokens.count - 1)
                }
                var out = try model.logits(tokens: tokens, positions: positions, context: .cache(cache, slots: slots), rows: rows)
                var next = prompts
                while true {
                    // Compare the logits just produced with the full forward.
                    var active: [Int] = []
                    for s in 0..<3 where next[s] <= seqs[s].count { active.append(s) }
                    for (i, s) in active.enumerated() {
                        let pos = next[s] - 1
                        let got = Array(out[(i * V)..<((i + 1) * V)])
                        let want = Array(full[s][(pos * V)..<((pos + 1) * V)])
                        for k in 0..<V { worst = max(worst, abs(got[k] - want[k])) }
                    }
                    let stepping = active.filter { next[$0] < seqs[$0].count }
                    if stepping.isEmpty { break }
                    tokens = stepping.map { seqs[$0][next[$0]] }
                    positions = stepping.map { Int32(next[$0]) }
                    slots = stepping.map { Int32($0) }
                    out = try model.logits(tokens: tokens, positions: positions, context: .cache(cache, slots: slots),
                                           rows: Array(0..<stepping.count))
                    for s in 0..<3 where !stepping.contains(s) { next[s] = seqs[s].count + 1 }
                    for s in stepping { next[s] += 1 }
                }
                XCTAssertEqual(worst, 0, "\(name), \(threads) threads: KV-cache decoding differs from the full forward by \(worst)")
            }
        }
    }

    func testPackedBatchEqualsEachSequenceAlone() throws {
        Compute.setThreads(2)
        for name in Self.families {
            let model = try TransformerModel.load(directory: fixtureModel(name))
            let V = model.architecture.vocabSize
            let seqs = sequences(vocab: V, lengths: [6, 13, 1, 9], seed: 11)
            let batch = PackedBatch(seqs)
            let packed = try model.logits(tokens: batch.tokens, positions: batch.positions,
                                          context: .packed(sequenceStarts: batch.sequenceStarts),
                                          rows: Array(0..<batch.tokens.count))
            var alone: [Float] = []
            for s in seqs { alone += try fullLogits(model, s) }
            assertIdentical(packed, alone, "\(name): packed batch vs sequences alone")
        }
    }

    func testCopiedPrefixDecodesLikeItsSource() throws {
        Compute.setThreads(2)
        let model = try TransformerModel.load(directory: fixtureModel("qwen2_tied"))
        let cache = KVCache(architecture: model.architecture, slots: 2, capacity: 8)
        let prompt: [Int32] = [5, 17, 3, 90]
        _ = try model.logits(tokens: prompt, positions: [0, 1, 2, 3], context: .cache(cache, slots: [0, 0, 0, 0]), rows: [3])
        cache.copyPrefix(from: 0, to: 1, count: 4)
        let a = try model.logits(tokens: [42, 42], positions: [4, 4], context: .cache(cache, slots: [0, 1]), rows: [0, 1])
        let V = model.architecture.vocabSize
        assertIdentical(Array(a[0..<V]), Array(a[V..<(2 * V)]), "copied prefix")
        let full = try fullLogits(model, prompt + [42])
        assertIdentical(Array(a[0..<V]), Array(full[(4 * V)...]), "copied prefix vs full forward")
    }

    func testBadInputsAreRefusedBeforeAnyKernelRuns() throws {
        let model = try TransformerModel.load(directory: fixtureModel("gpt2"))
        let V = model.architecture.vocabSize
        XCTAssertThrowsError(try model.logits(tokens: [1, Int32(V)], positions: [0, 1],
                                              context: .packed(sequenceStarts: [0, 2]), rows: [0])) { e in
            XCTAssertEqual(e as? InputError, .tokenOutOfRange(index: 1, token: Int32(V), vocabSize: V))
        }
        XCTAssertThrowsError(try model.logits(tokens: [1, -3], positions: [0, 1],
                                              context: .packed(sequenceStarts: [0, 2]), rows: [0]))
        // GPT-2 has 32 learned positions.
        XCTAssertThrowsError(try model.logits(tokens: [1], positions: [32], context: .packed(sequenceStarts: [0, 1]), rows: [0])) { e in
            XCTAssertEqual(e as? InputError, .positionOutOfRange(index: 0, position: 32, limit: 32))
        }
        XCTAssertThrowsError(try model.logits(tokens: [1, 2], positions: [0, 1], context: .packed(sequenceStarts: [0, 3]), rows: [0]))
        let cache = KVCache(architecture: model.architecture, slots: 1, capacity: 4)
        XCTAssertThrowsError(try model.logits(tokens: [1], positions: [4], context: .cache(cache, slots: [0]), rows: [0]))
        XCTAssertThrowsError(try model.logits(tokens: [1], positions: [0], context: .cache(cache, slots: [1]), rows: [0]))
    }
}
