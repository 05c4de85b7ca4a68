// Long on purpose (~540 lines): one executable whose subcommands (engine, generate, train, json, server, projections) share setup code.
// ember-bench: the Swift side of `bench/run`. Prints one JSON object per measurement so the
// driver can set figures side by side with PyTorch's.
//
//   ember-bench engine --shape tiny|0.5b [--steps N] [--threads N]
//   ember-bench sgemm [--threads N]
import Chat
import CKernels
import COpenBLAS
import Engine
import Foundation
import Kernels
import Models
import RPC
import Ranks
import Tokenizer
import Weights

func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }
func median(_ xs: [Double]) -> Double { let s = xs.sorted(); return s[s.count / 2] }
func peakRSSBytes() -> Int {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return usage.ru_maxrss * 1024
}
func emit(_ dict: [String: Any]) {
    let data = try! JSONSerialization.data(withJSONObject: dict, options: [.sortedKeys])
    FileHandle.standardOutput.write(data + Data([0x0A]))
}

/// Runs `body` with the kernel clock on when `on` (`--clock`): its readings for the matrix products
/// and attention (zeros when off).
typealias ClockReading = (matmulSeconds: Double, matmulFLOPs: Double, attentionSeconds: Double)
func clocked(_ on: Bool, _ body: () throws -> Void) rethrows -> ClockReading {
    KernelClock.reset()
    KernelClock.enabled = on
    defer { KernelClock.enabled = false }
    try body()
    let r = KernelClock.read()
    return (r[.matrixProducts]!.seconds, r[.matrixProducts]!.flops, r[.attention]!.seconds)
}

BLASCore.restartIfMisdetected()
if let problem = KernelSet.applyEnvironment() { FileHandle.standardError.write(Data((problem + "\n").utf8)); exit(2) }
Compute.keepFreedMemory()
let args = Array(CommandLine.arguments.dropFirst())
func option(_ name: String, _ fallback: String) -> String {
    if let i = args.firstIndex(of: name), i + 1 < args.count { return args[i + 1] }
    return fallback
}
let threads = Int(option("--threads", "2")) ?? 2
Compute.setThreads(threads)

/// Benchmark shapes: (a) tiny qwen2, (b) Qwen2.5-0.5B.
struct Shape {
    let name: String, config: [String: Any], batch: Int, seqLen: Int
    static func named(_ n: String) -> Shape {
        switch n {
        case "1.5b":
            return Shape(name: n, config: ["model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
                                           "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960,
                                           "vocab_size": 151936, "tie_word_embeddings": true, "max_position_embeddings": 32768],
                         batch: 8, seqLen: 256)
        case "0.5b":
            return Shape(name: n, config: ["model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
                                           "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                                           "vocab_size": 151936, "tie_word_embeddings": true, "max_position_embeddings": 32768],
                         batch: 8, seqLen: 256)
        default:
            return Shape(name: "tiny", config: ["model_type": "qwen2", "hidden_size": 256, "num_hidden_layers": 4,
                                                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 768,
                                                "vocab_size": 1024, "tie_word_embeddings": true, "max_position_embeddings": 2048],
                         batch: 64, seqLen: 128)
        }
    }
}

/// Multiply-add FLOPs of one forward over the batch (matmuls, attention, logits head).
func forwardFLOPs(_ a: Architecture, tokens: Int, seqLen: Int, batch: Int) -> Double {
    let C = Double(a.hiddenSize)
    let perLayer = C * Double(a.qkvWidth) + Double(a.attentionWidth) * C + C * Double(a.mlpInWidth)
        + Double(a.intermediateSize) * C
    let matmul = 2 * Double(tokens) * (Double(a.layers) * perLayer + C * Double(a.vocabSize))
    let attention = Double(a.layers * batch) * 2 * 2 * Double(seqLen * (seqLen + 1) / 2) * Double(a.attentionWidth)
    return matmul + attention
}

/// A model of the shape with random weights at a trained model's scale (uniform ±0.035, norms 1).
func makeModel(_ shape: Shape, training: Bool = true) throws -> TransformerModel {
    let model = try TransformerModel(config: try JSONSerialization.data(withJSONObject: shape.config))
    defer {
        // --weights-dtype bf16: the weights rounded to bfloat16 (a float32 master kept for training).
        if option("--weights-dtype", "f32") == "bf16" { model.parameters.useBF16(keepMaster: training) }
    }
    var rng = SeededRandom(seed: UInt64(option("--seed", "42"))!)
    let store = model.parameters
    for slot in store.layout.slots {
        let p = store.values + slot.offset
        if slot.name.hasSuffix("norm.weight") { for i in 0..<slot.count { p[i] = 1 } }
        else { for i in 0..<slot.count { p[i] = rng.uniform() * 0.07 - 0.035 } }
    }
    store.markModified()
    return model
}

/// SplitMix64 floats (fast, unlike SystemRandomNumberGenerator for hundreds of millions of draws).
typealias SeededRandom = SplitMix64
extension SplitMix64 {
    mutating func uniform() -> Float { nextUnit() }
}

/// Decode throughput: `--batch` prompts of `--prompt` tokens, `--new` greedy tokens each.
func benchGenerate() throws {
    let shape = Shape.named(option("--shape", "tiny"))
    let batch = Int(option("--batch", "1"))!, promptLen = Int(option("--prompt", "16"))!
    let newTokens = Int(option("--new", "128"))!
    let model = try makeModel(shape, training: false)
    var rng = SeededRandom(seed: 7)
    let V = UInt64(model.architecture.vocabSize)
    let prompts = (0..<batch).map { _ in (0..<promptLen).map { _ in Int32(rng.next() % V) } }
    var params = SamplingParams()
    params.temperature = 0
    params.maxTokens = newTokens
    // --adapters N: N LoRA adapters (rank --lora-rank, every projection, non-zero B) resident,
    // prompt p decoded under adapter p mod N: a mixed-adapter batch.
    let adapterCount = Int(option("--adapters", "0"))!, rank = Int(option("--lora-rank", "16"))!
    let adapters = try (0..<adapterCount).map { k in
        let a = try LoRAAdapter(model: model, options: LoRAOptions(rank: rank, alpha: Float(2 * rank), targetModules: ["all-linear"]),
                                seed: UInt64(k))
        for s in a.sites { for i in 0..<(rank * s.outFeatures) { a.parameters.values[s.bOffset + i] = Float(rng.next() % 1000) * 1e-6 } }
        return a
    }
    // --clock: the time in matrix products and in attention, as for `train`, split the same way.
    let clock = args.contains("--clock")
    var times: [Double] = [], clockFull: [ClockReading] = []
    var clockFirst = clockFull
    for i in 0..<3 {
        let gen = Generator(model: model, tokenizer: nil, slots: batch, capacity: promptLen + newTokens)
        let t0 = now()
        let c = try clocked(clock) {
            if adapters.isEmpty {
                let out = try gen.generate(prompts: prompts, params: params)
                precondition(out.results.allSatisfy { $0[0].tokens.count == newTokens })
            } else {
                for (p, prompt) in prompts.enumerated() {
                    _ = try gen.submit(prompts: [prompt], params: params, adapter: adapters[p % adapters.count])
                }
                var done = 0
                while done < prompts.count { done += try gen.step().count }
            }
        }
        if i > 0 { times.append(now() - t0); clockFull.append(c) }
    }
    // The prompts' pass and the first token alone (one new token), to split the decode steps out
    // of the timed region: decode step = (total - this) / (new - 1).
    var firstTimes: [Double] = []
    if adapters.isEmpty && newTokens > 1 {
        var once = params
        once.maxTokens = 1
        for i in 0..<3 {
            let gen = Generator(model: model, tokenizer: nil, slots: batch, capacity: promptLen + newTokens)
            let t0 = now()
            let c = try clocked(clock) { _ = try gen.generate(prompts: prompts, params: once) }
            if i > 0 { firstTimes.append(now() - t0); clockFirst.append(c) }
        }
    }
    let a = model.architecture
    // Per decode step: each projection's weights and the (tied) head read once, 2 FLOPs per
    // multiply-add per row; attention over the context is left out (a few percent here).
    let weightElements = a.layers * (a.hiddenSize * a.qkvWidth + a.attentionWidth * a.hiddenSize
        + a.hiddenSize * a.mlpInWidth + a.intermediateSize * a.hiddenSize) + a.hiddenSize * a.vocabSize
    var figures: [String: Any] = ["kind": "generate", "impl": "ember", "shape": shape.name, "batch": batch, "weights_dtype": option("--weights-dtype", "f32"), "prompt": promptLen, "new": newTokens,
          "adapters": adapterCount, "decode_tok_s": Double(batch * newTokens) / median(times), "seconds": times,
          "peak_rss_bytes": peakRSSBytes(), "decode_weight_bytes": weightElements * (option("--weights-dtype", "f32") == "bf16" ? 2 : 4),
          "decode_step_flops": 2 * Double(weightElements) * Double(batch)]
    if !firstTimes.isEmpty {
        figures["prompt_and_first_s"] = median(firstTimes)
        figures["decode_step_s"] = (median(times) - median(firstTimes)) / Double(newTokens - 1)
        if clock {
            // Per decode step, and the bytes attention reads from the KV cache: every cached key
            // and value row of every layer and sequence, at the steps' mean context length.
            let steps = Double(newTokens - 1)
            figures["decode_step_matmul_s"] = (median(clockFull.map(\.matmulSeconds)) - median(clockFirst.map(\.matmulSeconds))) / steps
            figures["decode_step_attention_s"] = (median(clockFull.map(\.attentionSeconds))
                                                  - median(clockFirst.map(\.attentionSeconds))) / steps
            let meanContext = Double(promptLen) + Double(newTokens) / 2
            figures["decode_step_kv_bytes"] = meanContext * Double(2 * a.kvWidth * a.layers * batch * 4)
        }
    }
    emit(figures)
}

/// Decode attention alone: `--batch` sequences of `--context` cached positions in a KV cache of
/// the shape's layout, one query row each, every layer in turn (the cache read once a step, as in
/// a decode step). GB/s of keys and values read, median of `--repeat` steps.
func benchAttention() throws {
    let shape = Shape.named(option("--shape", "tiny"))
    let batch = Int(option("--batch", "32"))!, context = Int(option("--context", "80"))!
    let repeats = Int(option("--repeat", "200"))!
    let (_, a) = try ModelRegistry.architecture(config: JSONSerialization.data(withJSONObject: shape.config))
    let cache = KVCache(architecture: a, slots: batch, capacity: context)
    var rng = SeededRandom(seed: 5)
    for l in 0..<a.layers {
        for s in 0..<batch {
            let k = cache.keys(layer: l, slot: s), v = cache.values(layer: l, slot: s)
            for i in 0..<(context * a.kvWidth) { k[i] = rng.uniform() - 0.5; v[i] = rng.uniform() - 0.5 }
        }
    }
    let HS = a.headDim, NH = a.heads, kvW = a.kvWidth
    let q = UnsafeMutablePointer<Float>.allocate(capacity: batch * NH * HS), out = UnsafeMutablePointer<Float>.allocate(capacity: batch * NH * HS)
    defer { q.deallocate(); out.deallocate() }
    for i in 0..<(batch * NH * HS) { q[i] = rng.uniform() - 0.5 }
    let attnShape = AttentionShape(heads: NH, kvHeads: a.kvHeads, headSize: HS, scale: 1 / Float(HS).squareRoot())
    var times: [Double] = []
    for _ in 0..<repeats {
        let t0 = now()
        for l in 0..<a.layers {
            attentionForward(out, nil, q: q, qStride: NH * HS, rows: batch, shape: attnShape, maxKeys: context) { t in
                KeyValueSpan(keys: cache.keys(layer: l, slot: t), values: cache.values(layer: l, slot: t), rowStride: kvW, count: context)
            }
        }
        times.append(now() - t0)
    }
    var check: Float = 0
    for i in 0..<(batch * NH * HS) { check += out[i] }
    let bytes = Double(a.layers * batch * context * kvW * 2 * 4)
    emit(["kind": "attention", "shape": shape.name, "batch": batch, "context": context, "step_s": median(times),
          "kv_bytes": bytes, "kv_gb_s": bytes / median(times) / 1e9, "kv_gb_s_best": bytes / times.min()! / 1e9, "checksum": Double(check)])
}

/// Scoring throughput: log-probs of every token of `--batch` sequences of `--len` tokens.
func benchScore() throws {
    let shape = Shape.named(option("--shape", "tiny"))
    let batch = Int(option("--batch", String(shape.batch)))!, len = Int(option("--len", String(shape.seqLen)))!
    let model = try makeModel(shape)
    var rng = SeededRandom(seed: 9)
    let V = UInt64(model.architecture.vocabSize)
    let seqs = (0..<batch).map { _ in ScoredSequence(tokens: (0..<len).map { _ in Int32(rng.next() % V) }, responseStart: 1) }
    var times: [Double] = []
    for i in 0..<3 {
        let t0 = now()
        _ = try Scoring.score(model: model, sequences: seqs)
        if i > 0 { times.append(now() - t0) }
    }
    emit(["kind": "score", "impl": "ember", "shape": shape.name, "tokens": batch * len,
          "score_tok_s": Double(batch * len) / median(times), "seconds": times,
          "flops": forwardFLOPs(model.architecture, tokens: batch * len, seqLen: len, batch: batch)])
}

/// train_step throughput with a policy loss (`--mode ppo|lp_reg`), rollouts' sampling
/// statistics supplied (as the rollout store does), one optimizer step per call.
func benchTrain() throws {
    let shape = Shape.named(option("--shape", "tiny"))
    let steps = Int(option("--steps", shape.name == "tiny" ? "5" : "2"))!
    let mode = option("--mode", "ppo")
    let model = try makeModel(shape)
    var rng = SeededRandom(seed: 11)
    let V = UInt64(model.architecture.vocabSize)
    let prompt = 16
    let seqs = (0..<shape.batch).map { _ in (0..<shape.seqLen).map { _ in Int32(rng.next() % V) } }
    var options = GenerationOptions()
    options.proxy = .minP(0.02)
    let scored = try Scoring.score(model: model, sequences: seqs.map { ScoredSequence(tokens: $0, responseStart: prompt) },
                                   options: options)
    let items = seqs.enumerated().map { b, s in
        TrainItem(tokens: s, responseStart: prompt, advantages: Array(repeating: b % 2 == 0 ? 1 : -1, count: s.count - prompt),
                  oldLogprobs: scored[b].logprobs, proxyLogprobs: scored[b].proxyLogprobs)
    }
    let config: LossConfig = mode == "lp_reg" ? LossConfig(mode: .lpReg(LpRegOptions())) : LossConfig(mode: .ppo(ClipOptions()))
    // --lora-rank R: train a LoRA adapter on every projection (base frozen) instead of the model.
    let rank = Int(option("--lora-rank", "0"))!
    // --micro-batch-tokens N: gradient accumulation over micro-batches of at most N tokens (the
    // same update, a fraction of the activation memory).
    let microTokens = Int(option("--micro-batch-tokens", "0")).flatMap { $0 > 0 ? $0 : nil }
    let adapter = rank > 0 ? try LoRAAdapter(model: model, options: LoRAOptions(rank: rank, alpha: Float(2 * rank),
                                                                               targetModules: ["all-linear"]), seed: 1) : nil
    let trainer = Trainer(model: model, adapter: adapter, optimizer: AdamW(settings: AdamWSettings(lr: 1e-6)))
    var times: [Double] = []
    var selected = 0
    var phases: [Double] = []
    // --clock: the time in matrix products and in attention, per step (the timed steps' medians).
    let clock = args.contains("--clock")
    var readings: [ClockReading] = []
    for i in 0..<(steps + 1) {
        let t0 = now()
        var m = TrainMetrics()
        let c = try clocked(clock) { m = try trainer.step(items: items, config: config, microBatchTokens: microTokens) }
        if i > 0 { times.append(now() - t0); readings.append(c) }
        selected = m.lpRegRegularized
        if i > 0 { phases = [m.secondsForward, m.secondsBackward, m.secondsOptimizer] }
    }
    var clockFields: [String: Any] = [:]
    if clock {
        clockFields = ["matmul_seconds": median(readings.map(\.matmulSeconds)), "matmul_flops": readings[0].matmulFLOPs,
                       "attention_seconds": median(readings.map(\.attentionSeconds)), "clocked_step_seconds": median(times)]
    }
    let tokens = seqs.count * shape.seqLen
    emit(["kind": "train", "impl": "ember", "shape": shape.name, "mode": mode, "tokens": tokens, "lora_rank": rank,
          "micro_batch_tokens": microTokens ?? 0, "seconds_forward_backward_optimizer": phases,
          "forward_flops": forwardFLOPs(model.architecture, tokens: tokens, seqLen: shape.seqLen, batch: shape.batch),
          "parameters": model.parameterCount,
          "train_tok_s": Double(tokens) / median(times), "seconds": times, "lp_reg_regularized": selected,
          "peak_rss_bytes": peakRSSBytes()].merging(clockFields) { a, _ in a })
}

func benchEngine() throws {
    if let mb = Int(option("--logit-chunk-mb", "")) { TransformerModel.logitChunkFloats = mb << 18 }
    let shape = Shape.named(option("--shape", "tiny"))
    let steps = Int(option("--steps", shape.name == "tiny" ? "5" : "2")) ?? 3
    let model = try makeModel(shape)
    var rng = SystemRandomNumberGenerator()
    let V = model.architecture.vocabSize
    let seqs = (0..<shape.batch).map { _ in (0..<shape.seqLen).map { _ in Int32.random(in: 0..<Int32(V), using: &rng) } }
    let batch = PackedBatch(seqs)
    let tokens = batch.tokens.count
    let flops = forwardFLOPs(model.architecture, tokens: tokens, seqLen: shape.seqLen, batch: shape.batch)

    // Forward: full logits for every position, chunked (scoring).
    var forwardTimes: [Double] = []
    for i in 0..<(steps + 1) {
        let t0 = now()
        var sink: Float = 0
        // In a spinning scope, as `Scoring.score` runs it.
        try Compute.spinning {
            let acts = try model.forward(tokens: batch.tokens, positions: batch.positions,
                                         context: .packed(sequenceStarts: batch.sequenceStarts))
            model.withLogitChunks(hidden: acts.hidden.pointer, rows: Array(0..<tokens), chunkRows: model.defaultChunkRows()) { _, l in
                sink += l[0]
            }
        }
        if i > 0 { forwardTimes.append(now() - t0) }
        if sink.isNaN { print("nan") }
    }
    // Train step: forward with saved activations, cross-entropy, backward, AdamW.
    let ce = NextTokenCrossEntropy(batch: batch)
    let adam = AdamW(settings: AdamWSettings(lr: 1e-5, weightDecay: 0.01, gradClip: 1.0))
    var trainTimes: [Double] = []
    for i in 0..<(steps + 1) {
        let t0 = now()
        _ = try Training.accumulateGradients(model: model, batch: batch, outputRows: ce.outputRows, loss: ce.function)
        try adam.step(model.parameters)
        if i > 0 { trainTimes.append(now() - t0) }
    }
    let f = median(forwardTimes), t = median(trainTimes)
    emit(["kind": "engine", "impl": "ember", "shape": shape.name, "tokens": tokens, "threads": threads,
          "parameters": model.parameterCount,
          "forward_tok_s": Double(tokens) / f, "train_tok_s": Double(tokens) / t,
          "forward_gflops": flops / f / 1e9, "train_gflops": 3 * flops / t / 1e9,
          "forward_s": forwardTimes, "train_s": trainTimes, "peak_rss_bytes": peakRSSBytes()])
}

/// Memory read bandwidth: a 2 GB buffer (well past the L3) summed once per round by `--threads`
/// threads, each a contiguous half; best and median of 7 rounds. The yardstick for the
/// memory-bound phases (optimizer, batch-1 decode).
func benchBandwidth() {
    let count = 512 << 20
    let buffer = UnsafeMutablePointer<Float>.allocate(capacity: count)
    defer { buffer.deallocate() }
    parallelRanges(count, minPerThread: 1 << 20) { _, lo, hi in (buffer + lo).initialize(repeating: 1, count: hi - lo) }
    var times: [Double] = []
    for _ in 0..<7 {
        let t0 = now()
        let sums = UnsafeMutablePointer<Float>.allocate(capacity: threads)
        parallelRanges(threads, minPerThread: 1) { _, lo, hi in
            for t in lo..<hi {
                let a = count / threads * t, b = t == threads - 1 ? count : count / threads * (t + 1)
                sums[t] = readFloats(buffer + a, count: b - a)
            }
        }
        times.append(now() - t0)
        precondition((0..<threads).reduce(Float(0)) { $0 + sums[$1] } > 0)
        sums.deallocate()
    }
    let bytes = Double(count * 4)
    emit(["kind": "bandwidth", "threads": threads, "bytes": count * 4, "read_gb_s": bytes / median(times) / 1e9,
          "read_gb_s_best": bytes / times.min()! / 1e9])
}

/// One GEMM work item in the active kernel set on one thread with its operands hot in L2: a
/// `--rows` x `--depth` block of a row-major A times packed panels of `--cols` columns, for each
/// A row stride in `--lda` (floats). Strides whose rows share L1 sets (1,024, 2,048, 3,072) show
/// what the kernels' aliasing copy is for; the others the tile's own rate. GFLOP/s, best of 7.
/// `--transposed`: A given as Xᵀ (rows contiguous, k steps `lda` apart, as in a weight gradient),
/// which the kernels first copy k-major.
func benchTile() {
    let m = Int(option("--rows", "96"))!, n = Int(option("--cols", "256"))!, kc = Int(option("--depth", "256"))!
    let transposed = args.contains("--transposed")
    let strides = option("--lda", transposed ? "96,1024,2048" : "256,896,1024,1536,2048,2064,3072,3584").split(separator: ",").map { Int($0)! }
    let table = ember_kernels_table(KernelSet.active.code)!
    var rng = SeededRandom(seed: 11)
    let b = (0..<(n * kc)).map { _ in rng.uniform() - 0.5 }
    let pstride = 16 * kc
    let panels = UnsafeMutablePointer<Float>.allocate(capacity: (n + 15) / 16 * pstride)
    defer { panels.deallocate() }
    b.withUnsafeBufferPointer { table.pointee.pack_panels($0.baseAddress!, n, 1, kc, Int32(n), panels, pstride) }
    var c = [Float](repeating: 0, count: m * n)
    let reps = max(1, 2_000_000_000 / (2 * m * n * kc))
    var rows: [[String: Any]] = []
    for lda in strides {
        let a = (0..<(transposed ? kc * max(lda, m) : m * max(lda, kc))).map { _ in rng.uniform() - 0.5 }
        let (rs, ks) = transposed ? (1, lda) : (lda, 1)
        var times: [Double] = []
        a.withUnsafeBufferPointer { ap in c.withUnsafeMutableBufferPointer { cp in
            for _ in 0..<7 {
                let t0 = now()
                for _ in 0..<reps {
                    table.pointee.gemm_block(ap.baseAddress!, rs, ks, Int32(m), panels, pstride, Int32(n), kc, cp.baseAddress!, n,
                                             1, 0, 1, nil)
                }
                times.append(now() - t0)
            }
        } }
        rows.append(["lda": lda, "gflops": 2 * Double(m * n * kc * reps) / times.min()! / 1e9])
    }
    emit(["kind": "tile", "kernels": KernelSet.active.rawValue, "a": transposed ? "transposed" : "rows", "rows": m, "cols": n,
          "depth": kc, "strides": rows])
}

/// Large-matrix sgemm throughput: OpenBLAS and Ember's row-invariant projection kernel.
func benchSgemm() {
    let n = 2048
    let a = UnsafeMutablePointer<Float>.allocate(capacity: n * n), b = UnsafeMutablePointer<Float>.allocate(capacity: n * n)
    let c = UnsafeMutablePointer<Float>.allocate(capacity: n * n)
    for i in 0..<(n * n) { a[i] = Float.random(in: -1...1); b[i] = Float.random(in: -1...1) }
    var blas: [Double] = [], ours: [Double] = []
    for _ in 0..<5 {
        var t0 = now()
        sgemm(transA: false, transB: true, m: n, n: n, k: n, a: a, lda: n, b: b, ldb: n, c: c, ldc: n)
        blas.append(now() - t0)
        t0 = now()
        project(c, a, rows: n, b, outFeatures: n, inFeatures: n)
        ours.append(now() - t0)
    }
    let flops = 2 * Double(n * n * n)
    emit(["kind": "sgemm", "threads": threads, "size": n, "kernels": KernelSet.active.rawValue,
          "openblas_core": BLASCore.name, "openblas_gflops": flops / blas.min()! / 1e9,
          "ember_project_gflops": flops / ours.min()! / 1e9])
}

/// Ember's GEMM on a training step's shapes (forward projection x·Wᵀ, input gradient dY·W,
/// weight gradient dYᵀ·X) for `--shape`, against OpenBLAS on the same operands: GFLOP/s.
func benchGemm() {
    let shape = Shape.named(option("--shape", "tiny"))
    let reps = Int(option("--reps", "5"))!
    let T = shape.batch * shape.seqLen
    let cfg = shape.config
    let C = cfg["hidden_size"] as! Int, I = cfg["intermediate_size"] as! Int
    var rows: [[String: Any]] = []
    let D = C / (cfg["num_attention_heads"] as! Int), kv = cfg["num_key_value_heads"] as! Int, V = cfg["vocab_size"] as! Int
    // The layers' projections over all T rows, and the head over one logits chunk (the rows a
    // train step's loss takes at a time): every GEMM shape of a train step.
    if let mb = Int(option("--logit-chunk-mb", "")) { TransformerModel.logitChunkFloats = mb << 18 }
    let chunk = min(T, max(1, TransformerModel.logitChunkFloats / V))
    let ops = [("mlp_in", 2 * I, C, T), ("mlp_down", C, I, T), ("attn_qkv", C + 2 * kv * D, C, T), ("attn_o", C, C, T), ("head", V, C, chunk)]
    let only = option("--ops", "").split(separator: ",").map(String.init)
    // --thp: the operands in 2 MB-aligned memory advised for transparent huge pages.
    let thp = CommandLine.arguments.contains("--thp")
    func floats(_ n: Int) -> UnsafeMutablePointer<Float> {
        guard thp else { return .allocate(capacity: n) }
        var p: UnsafeMutableRawPointer?
        let bytes = (n * 4 + (2 << 20) - 1) / (2 << 20) * (2 << 20)
        guard posix_memalign(&p, 2 << 20, bytes) == 0, let p else { fatalError("posix_memalign") }
        _ = madvise(p, bytes, 14)   // MADV_HUGEPAGE
        return p.bindMemory(to: Float.self, capacity: n)
    }
    for (name, o, i, T) in ops where only.isEmpty || only.contains(name) {
        let x = floats(T * i), w = floats(o * i)
        let dy = floats(T * o), y = floats(max(T * o, o * i, T * i))
        for p in [x, w, dy] { _ = p }
        for j in 0..<(T * i) { x[j] = Float(j % 97) * 0.01 - 0.4 }
        for j in 0..<(o * i) { w[j] = Float(j % 89) * 0.01 - 0.4 }
        for j in 0..<(T * o) { dy[j] = Float(j % 83) * 0.01 - 0.4 }
        let flops = 2.0 * Double(T) * Double(o) * Double(i)
        func best(_ f: () -> Void) -> Double { var b = 1e9; for _ in 0..<reps { let t0 = now(); f(); b = min(b, now() - t0) }; return flops / b / 1e9 }
        rows.append(["op": name + " forward", "m": T, "n": o, "k": i, "ember": best { project(y, x, rows: T, w, outFeatures: o, inFeatures: i) },
                     "openblas": best { sgemm(transA: false, transB: true, m: T, n: o, k: i, a: x, lda: i, b: w, ldb: i, c: y, ldc: o) }])
        rows.append(["op": name + " dX", "ember": best { gemm(m: T, n: i, k: o, .rows(dy, ld: o), .rows(w, ld: i), y, ldc: i) },
                     "openblas": best { sgemm(transA: false, transB: false, m: T, n: i, k: o, a: dy, lda: o, b: w, ldb: i, c: y, ldc: i) }])
        rows.append(["op": name + " dW", "ember": best { gemm(m: o, n: i, k: T, .transposed(dy, ld: o), .rows(x, ld: i), y, ldc: i) },
                     "openblas": best { sgemm(transA: true, transB: false, m: o, n: i, k: T, a: dy, lda: o, b: x, ldb: i, c: y, ldc: i) }])
        for p in [x, w, dy, y] { if thp { free(p) } else { p.deallocate() } }
    }
    emit(["kind": "gemm", "shape": shape.name, "threads": threads, "kernels": KernelSet.active.rawValue, "rows": rows])
}

/// The tiny shape's decode projections at `--rows` rows (default 32) with packed weights, as a
/// generator step runs them (inside the spinning scope): GFLOP/s of each projection with its
/// weights hot in cache, and of a whole layer stack (4 layers + head, distinct weights, 13.6 MB)
/// streamed from memory as a decode step does.
func benchProjections() {
    let m = Int(option("--rows", "32"))!
    var rng = SeededRandom(seed: 3)
    var figures: [String: Any] = ["kind": "projections", "rows": m, "threads": threads]
    // --shape: the projections of that shape (tiny: 4 layers + a 1,024-row head slice; 0.5b: 24
    // layers + the whole 151,936-row head, 2 GB streamed per step).
    let shape = Shape.named(option("--shape", "tiny"))
    let cfg = shape.config
    let C = cfg["hidden_size"] as! Int, I = cfg["intermediate_size"] as! Int, L = cfg["num_hidden_layers"] as! Int
    let D = C / (cfg["num_attention_heads"] as! Int), kv = cfg["num_key_value_heads"] as! Int
    let headRows = shape.name == "tiny" ? 1024 : cfg["vocab_size"] as! Int
    figures["shape"] = shape.name
    let shapes = [("qkv", C + 2 * kv * D, C), ("o", C, C), ("mlp_in", 2 * I, C), ("down", C, I)]
    func matrix(_ n: Int, _ k: Int) -> PackedMatrix {
        let w = (0..<(n * k)).map { _ in Float(rng.uniform() - 0.5) }
        return PackedMatrix(w, rows: n, columns: k, bf16: option("--weights-dtype", "f32") == "bf16")
    }
    let x = (0..<(m * max(2 * I, headRows))).map { _ in Float(rng.uniform() - 0.5) }
    var y = [Float](repeating: 0, count: m * max(2 * I, headRows))
    let dummy = [Float](repeating: 0, count: 1)
    func run(_ w: PackedMatrix) {
        project(&y, x, rows: m, dummy, outFeatures: w.rows, inFeatures: w.columns, packed: w)
    }
    for (name, n, k) in shapes + [("head", headRows, C)] {
        let w = matrix(n, k)
        let reps = max(10, 400_000_000 / (m * n * k))
        var times: [Double] = []
        Compute.spinning {
            for _ in 0..<7 {
                let t0 = now()
                for _ in 0..<reps { run(w) }
                times.append(now() - t0)
            }
        }
        figures[name + "_hot_gflops"] = 2 * Double(m * n * k * reps) / median(times) / 1e9
    }
    let stack = (0..<L).flatMap { _ in shapes.map { matrix($0.1, $0.2) } } + [matrix(headRows, C)]
    let macs = stack.reduce(0) { $0 + m * $1.rows * $1.columns }
    let reps = max(10, 400_000_000 / macs)
    var times: [Double] = []
    Compute.spinning {
        for _ in 0..<7 {
            let t0 = now()
            for _ in 0..<reps { for w in stack { run(w) } }
            times.append(now() - t0)
        }
    }
    // The best of 7 as well as the median: on a shared machine the minimum is the steadier figure.
    figures["stack_gflops"] = 2 * Double(macs * reps) / median(times) / 1e9
    figures["stack_best_gflops"] = 2 * Double(macs * reps) / times.min()! / 1e9
    figures["stack_ms"] = median(times) / Double(reps) * 1e3
    figures["stack_gb_per_s"] = Double(stack.reduce(0) { $0 + $1.byteCount }) * Double(reps) / median(times) / 1e9
    emit(figures)
}

/// JSON cost of a train_step request of 512 sequences × 512 tokens (ids, advantages and old
/// log-probs per token): decoding and parameter extraction, and encoding the same payload.
func benchJSON() throws {
    var rng = SeededRandom(seed: 5)
    let seqs = 512, len = 512
    let batch: [[String: Any]] = (0..<seqs).map { _ in
        ["tokens": (0..<len).map { _ in Int(rng.next() % 150000) }, "response_start": 64, "advantage": 1.0,
         "old_logprobs": (0..<(len - 64)).map { _ in -Double(rng.uniform()) * 5 }]
    }
    let request: [String: Any] = ["jsonrpc": "2.0", "id": 1, "method": "train_step",
                                  "params": ["batch": batch, "loss": ["mode": "lp_reg"]]]
    let body = JSONRPC.encode(request)
    var decodeTimes: [Double] = [], encodeTimes: [Double] = []
    for _ in 0..<3 {
        var t0 = now()
        guard case let .single(.success(r), _) = JSONRPC.decode(body) else { fatalError("bench request did not decode") }
        let p = try Params(r.params)
        var count = 0
        for item in try p.objects("batch") { count += try item.tokens("tokens").count + (try item.floats("old_logprobs").count) }
        decodeTimes.append(now() - t0)
        t0 = now()
        _ = JSONRPC.encode(request)
        encodeTimes.append(now() - t0)
        precondition(count == seqs * (2 * len - 64))
    }
    emit(["kind": "json", "impl": "ember", "bytes": body.count, "tokens": seqs * len,
          "decode_s": median(decodeTimes), "encode_s": median(encodeTimes)])
}

/// Encode throughput of a tokenizer folder on a text file cut into 50-line documents, one
/// thread (the same cut as bench/tokenizer_bench.py).
func benchTokenizer() throws {
    let dir = option("--dir", "Tests/Fixtures/tokenizers/qwen2")
    let file = option("--file", "")
    let tok = try Tokenizer(directory: dir)
    guard let data = FileManager.default.contents(atPath: file) else { throw TokenizerError.cannotRead(path: file) }
    let text = String(decoding: data, as: UTF8.self)
    var lines: [Substring] = []
    var start = text.startIndex
    for i in text.indices where text[i] == "\n" || text[i] == "\r\n" {
        let next = text.index(after: i)
        lines.append(text[start..<next]); start = next
    }
    if start < text.endIndex { lines.append(text[start...]) }
    let docs = stride(from: 0, to: lines.count, by: 50).map { lines[$0..<min(lines.count, $0 + 50)].joined() }
    var times: [Double] = [], count = 0
    for _ in 0..<3 {
        let t0 = now()
        count = 0
        for d in docs { count += try tok.encode(d, addSpecialTokens: false).count }
        times.append(now() - t0)
    }
    emit(["kind": "tokenizer", "impl": "ember", "dir": dir, "bytes": data.count, "tokens": count,
          "mb_s": Double(data.count) / 1e6 / median(times), "seconds": times])
}

/// Round trips of `server.info` over keep-alive connections to a running server (a second
/// process): per-request latency percentiles and requests/s, `connections` clients at once.
func benchServerLatency() throws {
    let port = Int(option("--port", "8377"))!
    let requests = Int(option("--requests", "20000"))!
    let connections = Int(option("--connections", "1"))!
    let body = #"{"jsonrpc":"2.0","method":"server.info","id":1}"#
    let request = Array("POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)".utf8)
    nonisolated(unsafe) var latencies = [[Double]](repeating: [], count: connections)
    let t0 = now()
    DispatchQueue.concurrentPerform(iterations: connections) { c in
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        guard withUnsafePointer(to: &addr, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }) == 0 else { return }
        var buf = [UInt8](repeating: 0, count: 65536)
        var mine: [Double] = []
        mine.reserveCapacity(requests / connections)
        for _ in 0..<(requests / connections) {
            let start = now()
            _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
            // Read one whole response: headers, then Content-Length bytes.
            var got = [UInt8]()
            var need = -1
            while true {
                let n = recv(fd, &buf, buf.count, 0)
                if n <= 0 { return }
                got += buf[0..<n]
                if need < 0, let end = got.indices.first(where: { $0 + 3 < got.count && got[$0] == 13 && got[$0 + 1] == 10 && got[$0 + 2] == 13 && got[$0 + 3] == 10 }) {
                    let head = String(decoding: got[0..<end], as: UTF8.self).lowercased()
                    let len = head.components(separatedBy: "content-length:").dropFirst().first.flatMap { Int($0.prefix { $0 != "\r" }.trimmingCharacters(in: .whitespaces)) } ?? 0
                    need = end + 4 + len
                }
                if need >= 0 && got.count >= need { break }
            }
            mine.append(now() - start)
        }
        latencies[c] = mine
    }
    let wall = now() - t0
    let all = latencies.flatMap { $0 }.sorted()
    guard !all.isEmpty else { FileHandle.standardError.write(Data("no responses from 127.0.0.1:\(port)\n".utf8)); exit(1) }
    func pct(_ p: Double) -> Double { all[min(all.count - 1, Int(Double(all.count) * p))] }
    emit(["kind": "server", "connections": connections, "requests": all.count, "p50_us": pct(0.5) * 1e6, "p99_us": pct(0.99) * 1e6,
          "requests_per_s": Double(all.count) / wall])
}

/// A bounded load against a running server from this (second) process: `--connections`
/// keep-alive clients, each cycling generate, logprob and server.info calls with unique ids for
/// `--seconds`, plus one client sending a small train_step every `--train-every` seconds. Every
/// answer must carry its own id and a result; anything else counts as an error, a missing
/// answer as lost. Generated rollouts are released right away, as an orchestrator that does not
/// train on them would. Prints one JSON line: calls, errors, lost, p50/p99 per method, train steps.
func benchLoad() throws {
    let port = Int(option("--port", "8377"))!
    let connections = Int(option("--connections", "64"))!
    let seconds = Double(option("--seconds", "300"))!
    let vocab = Int(option("--vocab", "96"))!
    let trainEvery = Double(option("--train-every", "2"))!
    final class Tally: @unchecked Sendable {
        let lock = NSLock()
        var latencies: [String: [Double]] = [:]
        var errors: [String] = []
        var lost = 0, trainSteps = 0, versions: [Int] = []
        func add(_ m: String, _ t: Double) { lock.lock(); latencies[m, default: []].append(t); lock.unlock() }
        func error(_ e: String) { lock.lock(); if errors.count < 20 { errors.append(e) }; lock.unlock() }
    }
    let tally = Tally()
    let deadline = now() + seconds

    @Sendable func connect() -> Int32? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var tv = timeval(tv_sec: 120, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Foundation.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        if rc != 0 { close(fd); return nil }
        return fd
    }
    /// One call on a keep-alive socket: the decoded answer, or nil if the connection failed.
    @Sendable func call(_ fd: Int32, _ body: [String: Any]) -> [String: Any]? {
        let json = try! JSONSerialization.data(withJSONObject: body)
        var request = Data("POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \(json.count)\r\n\r\n".utf8)
        request.append(json)
        let sent = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        if sent != request.count { return nil }
        var got = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 65536)
        var need = -1
        while need < 0 || got.count < need {
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { return nil }
            got += buf[0..<n]
            if need < 0, let end = got.indices.first(where: { $0 + 3 < got.count && got[$0] == 13 && got[$0 + 1] == 10 && got[$0 + 2] == 13 && got[$0 + 3] == 10 }) {
                let head = String(decoding: got[0..<end], as: UTF8.self).lowercased()
                let len = head.components(separatedBy: "content-length:").dropFirst().first.flatMap { Int($0.prefix { $0 != "\r" }.trimmingCharacters(in: .whitespaces)) } ?? 0
                need = end + 4 + len
            }
        }
        let headEnd = got.indices.first(where: { got[$0] == 13 && got[$0 + 1] == 10 && got[$0 + 2] == 13 && got[$0 + 3] == 10 })!
        return (try? JSONSerialization.jsonObject(with: Data(got[(headEnd + 4)...]))) as? [String: Any]
    }

    let group = DispatchGroup()
    for c in 0...connections {
        group.enter()
        Thread.detachNewThread {
            defer { group.leave() }
            guard var fd = connect() else { tally.error("connect failed"); return }
            var rng = SystemRandomNumberGenerator()
            var i = 0
            while now() < deadline {
                i += 1
                let id = "c\(c)-\(i)"
                var method = ["generate", "logprob", "server.info"][i % 3]
                var params: [String: Any] = [:]
                let tokens = (0..<Int.random(in: 2...8, using: &rng)).map { _ in Int.random(in: 0..<vocab, using: &rng) }
                if c == connections {
                    // The training client.
                    Thread.sleep(forTimeInterval: trainEvery)
                    method = "train_step"
                    params = ["batch": [["tokens": tokens + [1, 2], "response_start": 1, "advantage": 0.5]], "loss": ["mode": "lp_reg"],
                              "optimizer": ["lr": 1e-6]]
                } else if method == "generate" {
                    params = ["prompt_tokens": [tokens], "max_tokens": 16, "n": 2, "temperature": 1.0, "ignore_eos": true]
                } else if method == "logprob" {
                    params = ["sequences": [["tokens": tokens + tokens, "response_start": tokens.count]], "entropy": true]
                }
                let t0 = now()
                var body: [String: Any] = ["jsonrpc": "2.0", "id": id, "method": method]
                if !params.isEmpty { body["params"] = params }
                guard let answer = call(fd, body) else {
                    tally.lock.lock(); tally.lost += 1; tally.lock.unlock()
                    close(fd)
                    guard let again = connect() else { tally.error("reconnect failed"); return }
                    fd = again
                    continue
                }
                if answer["id"] as? String != id || answer["result"] == nil {
                    tally.error("\(method): \(answer)")
                    continue
                }
                tally.add(method, now() - t0)
                if method == "generate" {
                    // A well-behaved orchestrator frees the rollouts it will not train on.
                    let ids = ((answer["result"] as? [String: Any])?["results"] as? [[String: Any]])?
                        .flatMap { ($0["samples"] as? [[String: Any]] ?? []).compactMap { $0["rollout_id"] as? String } } ?? []
                    let t1 = now()
                    let released = call(fd, ["jsonrpc": "2.0", "id": id + "-r", "method": "rollouts.release", "params": ["rollout_ids": ids]])
                    if (released?["result"] as? [String: Any])?["released"] as? Int != ids.count { tally.error("release: \(String(describing: released))") }
                    else { tally.add("rollouts.release", now() - t1) }
                }
                if method == "train_step", let v = (answer["result"] as? [String: Any])?["weights_version"] as? Int {
                    tally.lock.lock(); tally.trainSteps += 1; tally.versions.append(v); tally.lock.unlock()
                }
            }
            close(fd)
        }
    }
    group.wait()
    var out: [String: Any] = ["kind": "load", "connections": connections, "seconds": seconds, "lost": tally.lost,
                              "errors": tally.errors.count, "error_samples": tally.errors, "train_steps": tally.trainSteps,
                              "versions_increasing": tally.versions == tally.versions.sorted() && Set(tally.versions).count == tally.versions.count]
    for (m, ts) in tally.latencies {
        let s = ts.sorted()
        out[m] = ["calls": s.count, "p50_ms": s[s.count / 2] * 1000, "p99_ms": s[min(s.count - 1, Int(Double(s.count) * 0.99))] * 1000]
    }
    emit(out)
}

/// Chat-template rendering (Qwen2.5's shipped template, a three-turn conversation with two tools)
/// and its tokenization, against one `generate` call (64 greedy tokens) on the embedded default
/// model: the share of a call that the chat path adds.
func benchChat() throws {
    let root = option("--root", FileManager.default.currentDirectoryPath)
    let source = try String(contentsOfFile: root + "/Tests/Fixtures/chat/templates/qwen2.5.jinja", encoding: .utf8)
    let template = try ChatTemplate(source: source)
    let conversation = #"""
    [{"role": "system", "content": "You are a careful calculator."},
     {"role": "user", "content": "What is 17 * 23? Check your work."},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "calculate", "arguments": {"expression": "17*23"}}}]},
     {"role": "tool", "content": "391"},
     {"role": "user", "content": "And plus 9?"}]
    """#
    let tools = #"""
    [{"type": "function", "function": {"name": "calculate", "description": "Evaluate an arithmetic expression.",
      "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
     {"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
      "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}]
    """#
    let messages = try JValue.parseJSON(Data(conversation.utf8)), toolList = try JValue.parseJSON(Data(tools.utf8))
    let modelDir = root + "/models/ember-default"
    let tokenizer = try Tokenizer(directory: modelDir)
    var renders: [Double] = [], encodes: [Double] = []
    var text = ""
    for _ in 0..<200 {
        let t0 = now()
        text = try template.render(messages: messages, tools: toolList)
        let t1 = now()
        _ = try tokenizer.encode(text, addSpecialTokens: false)
        renders.append(t1 - t0); encodes.append(now() - t1)
    }
    let model = try TransformerModel.load(directory: modelDir)
    let prompt = try tokenizer.encode("calc 17*23+9=", addSpecialTokens: false)
    var params = SamplingParams()
    params.temperature = 0; params.maxTokens = 64; params.ignoreEOS = true
    var gens: [Double] = []
    for _ in 0..<5 {
        let gen = Generator(model: model, tokenizer: tokenizer, slots: 1, capacity: 128)
        let t0 = now()
        _ = try gen.generate(prompts: [prompt], params: params)
        gens.append(now() - t0)
    }
    let render = median(renders), encode = median(encodes), generate = median(gens)
    emit(["kind": "chat", "render_ms": render * 1000, "tokenize_ms": encode * 1000, "generate_ms": generate * 1000,
          "chat_share_percent": 100 * (render + encode) / generate, "text_chars": text.count])
}

/// A model folder of the shape with random weights (config.json + model.safetensors, F32):
/// `ember-bench write-model --shape 0.5b --out DIR [--seed N]`, for server benchmarks.
func benchWriteModel() throws {
    let shape = Shape.named(option("--shape", "tiny"))
    let out = option("--out", "")
    guard !out.isEmpty else { throw WeightsError.writeFailed(path: "--out", reason: "give --out DIR") }
    try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
    let model = try makeModel(shape, training: false)
    let t0 = now()
    try model.save(to: out)
    emit(["kind": "write-model", "shape": shape.name, "dir": out, "parameters": model.parameterCount, "seconds": now() - t0])
}

/// The data-parallel gradient exchange alone, under mpirun: `ember-bench allreduce --floats N
/// [--rounds K]`. One tree node per rank (the even case); rank 0 prints the median seconds of a
/// whole exchange (reduce-scatter's data movement, the tree's additions, the all-gather) and the
/// bandwidths, then the same for one float (the latency).
func benchAllreduce() throws {
    guard let world = try MPIWorld.fromEnvironment(timeout: 300) else {
        throw WeightsError.writeFailed(path: "allreduce", reason: "run it under mpirun (mpirun -n 2 ember-bench allreduce)")
    }
    let floats = Int(option("--floats", "16777216")) ?? 1 << 24
    let rounds = Int(option("--rounds", "5")) ?? 5
    let tree = LeafTree(leaves: world.size)
    let blocks = tree.blocks(ranks: world.size)
    func measure(_ n: Int, _ rounds: Int) throws -> [Double] {
        let local = UnsafeMutablePointer<Float>.allocate(capacity: n), out = UnsafeMutablePointer<Float>.allocate(capacity: n)
        defer { local.deallocate(); out.deallocate() }
        var times: [Double] = []
        for r in 0...rounds {
            // The exchange may overwrite the local values (it adds in place): set them each round.
            for i in 0..<n { local[i] = Float(world.rank + 1) * 0.5 + Float(i % 7); out[i] = 0 }
            try world.barrier()
            let t0 = now()
            try world.reduce(tree: tree, blocks: blocks, local: [local], count: n, into: out)
            if r > 0 { times.append(now() - t0) }   // the first round warms buffers up
        }
        // Check: the sum over ranks of (rank + 1) / 2 + i % 7, exact in float for these values.
        let ranksSum = Float(world.size * (world.size + 1)) * 0.25
        for i in stride(from: 0, to: n, by: max(1, n / 97)) where out[i] != ranksSum + Float(world.size) * Float(i % 7) {
            throw WeightsError.writeFailed(path: "allreduce", reason: "element \(i) is \(out[i])")
        }
        return times
    }
    /// The anchor: Open MPI's MPI_Allreduce on the same buffer (its own order of additions).
    func native(_ n: Int, _ rounds: Int) throws -> [Double] {
        let buffer = UnsafeMutablePointer<Float>.allocate(capacity: n)
        defer { buffer.deallocate() }
        var times: [Double] = []
        for r in 0...rounds {
            for i in 0..<n { buffer[i] = Float(world.rank + 1) * 0.5 + Float(i % 7) }
            try world.barrier()
            let t0 = now()
            try world.nativeAllReduce(buffer, count: n)
            if r > 0 { times.append(now() - t0) }
        }
        return times
    }
    // Interleaved: Ember's exchange and MPI's all-reduce, round after round.
    var big: [Double] = [], anchor: [Double] = []
    for _ in 0..<rounds {
        big += try measure(floats, 1)
        anchor += try native(floats, 1)
    }
    let small = try measure(1, max(20, rounds)), smallAnchor = try native(1, max(20, rounds))
    if world.rank == 0 {
        let t = median(big), a = median(anchor), bytes = Double(floats * 4), r = Double(world.size)
        emit(["kind": "allreduce", "ranks": world.size, "hosts": world.hosts, "floats": floats, "bytes": floats * 4,
              "seconds_median": t, "seconds_min": big.min()!, "algorithm_gb_per_s": bytes / t / 1e9,
              "bus_gb_per_s": 2 * (r - 1) / r * bytes / t / 1e9, "latency_us": median(small) * 1e6, "rounds": rounds,
              "mpi_allreduce_seconds_median": a, "mpi_allreduce_gb_per_s": bytes / a / 1e9,
              "mpi_allreduce_latency_us": median(smallAnchor) * 1e6])
    }
    world.finish()
}

do {
    switch args.first {
    case "allreduce": try benchAllreduce()
    case "write-model": try benchWriteModel()
    case "chat": try benchChat()
    case "load": try benchLoad()
    case "server-latency": try benchServerLatency()
    case "tokenizer": try benchTokenizer()
    case "generate": try benchGenerate()
    case "attention": try benchAttention()
    case "score": try benchScore()
    case "train": try benchTrain()
    case "json": try benchJSON()
    case "sgemm": benchSgemm()
    case "tile": benchTile()
    case "bandwidth": benchBandwidth()
    case "gemm": benchGemm()
    case "projections": benchProjections()
    case "engine": try benchEngine()
    default:
        FileHandle.standardError.write("usage: ember-bench engine --shape tiny|0.5b [--steps N] [--threads N] | sgemm [--threads N] | tile [--rows M --cols N --depth K --lda L,L,... --transposed] | gemm --shape S [--reps N] [--ops mlp_in,mlp_down,attn_qkv,attn_o,head] [--thp] | tokenizer --dir D --file F | generate --shape S --batch B [--prompt P --new N] | score --shape S | projections [--rows M] | write-model --shape S --out DIR [--seed N]\n".data(using: .utf8)!)
        exit(2)
    }
} catch {
    FileHandle.standardError.write("ember-bench: \(error)\n".data(using: .utf8)!)
    exit(1)
}
