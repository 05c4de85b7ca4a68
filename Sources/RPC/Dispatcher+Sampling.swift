// generate and logprob: parameters to engine calls, results to JSON. The scheduler uses the
// split entry points (prepare, submit or score, result) to batch many clients' calls together;
// `call` runs a whole call at once.
import Engine
import Foundation
import Models

extension Dispatcher {
    func proxySpec(_ p: Params) throws -> ProxySpec? {
        guard let o = try p.object("proxy") else { return nil }
        try o.only(["min_p", "threshold"])
        if o.has("min_p") { return .minP(try o.float("min_p", min: 0)) }
        if o.has("threshold") { return .threshold(try o.float("threshold", min: 0)) }
        throw RPCError.invalidParams(path: "params.proxy", "give min_p (kappa) or threshold (tau)")
    }

    func options(_ p: Params) throws -> GenerationOptions {
        var o = GenerationOptions()
        o.logprobs = try p.bool("logprobs", true)
        o.topLogprobs = try p.int("top_logprobs", 0, min: 0, max: 20)
        o.entropy = try p.bool("entropy", false)
        o.proxy = try proxySpec(p)
        return o
    }

    /// A parsed `generate` call.
    public struct GenerateCall: Sendable {
        public var prompts: [[Int32]]
        public var n: Int
        public var params: SamplingParams
        public var options: GenerationOptions
        /// The LoRA adapter to sample under (nil: the base model).
        public var adapter: String?
        public init(prompts: [[Int32]], n: Int, params: SamplingParams, options: GenerationOptions, adapter: String? = nil) {
            self.prompts = prompts; self.n = n; self.params = params; self.options = options; self.adapter = adapter
        }
    }

    public func prepareGenerate(_ p: Params) throws -> GenerateCall {
        try p.only(["prompts", "prompt_tokens", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                    "stop_token_ids", "logprobs", "top_logprobs", "entropy", "proxy", "ignore_eos", "presence_penalty",
                    "frequency_penalty", "logit_bias", "adapter", "messages", "tools", "template_kwargs"])
        var prompts: [[Int32]]
        if p.has("messages") {
            guard !p.has("prompts") && !p.has("prompt_tokens") else {
                throw RPCError.invalidParams(path: "params.messages", "give messages, prompts or prompt_tokens, not several")
            }
            prompts = try chatPrompts(p)
        } else if p.has("prompt_tokens") {
            prompts = try p.tokenLists("prompt_tokens")
        } else if p.has("prompts") {
            let tok = try needTokenizer()
            prompts = try p.strings("prompts").map { try tok.encode($0, addSpecialTokens: true) }
        } else {
            throw RPCError.invalidParams(path: "params.prompts", "give prompts (text) or prompt_tokens")
        }
        var s = SamplingParams()
        s.maxTokens = try p.int("max_tokens", 64, min: 1)
        s.temperature = try p.float("temperature", 1, min: 0)
        s.topP = try p.float("top_p", 1)
        s.topK = try p.int("top_k", 0, min: 0)
        s.minP = try p.float("min_p", 0)
        if p.has("seed") { s.seed = UInt64(try p.int("seed", min: 0)) }
        if p.has("stop") { s.stop = try p.strings("stop") }
        if p.has("stop_token_ids") { s.stopTokenIds = try p.tokens("stop_token_ids") }
        s.ignoreEOS = try p.bool("ignore_eos", false)
        try Self.readPenalties(p, into: &s)
        let adapter = p.has("adapter") ? try trainer(for: p).adapter!.name : nil
        let call = GenerateCall(prompts: prompts, n: try p.int("n", 1, min: 1), params: s, options: try options(p), adapter: adapter)
        try limit(prompts.reduce(0) { $0 + $1.count + call.n * s.maxTokens }, "params.max_tokens")
        return call
    }

    /// Queues a parsed call on the generator (errors already translated).
    public func submit(_ call: GenerateCall) throws -> Int {
        do {
            let t = try call.adapter.map { try adapterTrainer($0, path: "params.adapter") } ?? trainer
            return try generator.submit(prompts: call.prompts, n: call.n, params: call.params, options: call.options,
                                        weightsVersion: t.weightsVersion, adapter: t.adapter)
        } catch { throw Self.translate(error) }
    }

    /// The JSON result of a finished `generate` call.
    public func generateResult(_ out: GenerationResult, _ call: GenerateCall) -> Any {
        tokensGenerated += out.results.reduce(0) { $0 + $1.reduce(0) { $0 + $1.tokens.count } }
        let version = call.adapter.flatMap { adapterTrainers[$0]?.weightsVersion } ?? trainer.weightsVersion
        return ["weights_version": version,
                "results": out.results.enumerated().map { i, samples -> [String: Any] in
                    ["prompt_index": i, "prompt_tokens": out.promptTokens[i].map(Int.init),
                     "samples": samples.map { sample -> [String: Any] in
                         var d: [String: Any] = ["rollout_id": sample.rolloutId ?? NSNull(), "tokens": sample.tokens.map(Int.init),
                                                 "text": sample.text, "finish_reason": sample.finishReason.rawValue,
                                                 "weights_version": sample.weightsVersion]
                         if call.options.logprobs { d["logprobs"] = sample.logprobs }
                         if let e = sample.entropies { d["entropies"] = e }
                         if let x = sample.proxyLogprobs { d["proxy_logprobs"] = x }
                         if let t = sample.topLogprobs { d["top_logprobs"] = t.map { $0.map { ["token": Int($0.token), "logprob": $0.logprob] } } }
                         return d
                     }]
                }]
    }

    /// Counts tokens generated outside `generateResult` (other front ends).
    public func countGenerated(_ n: Int) { tokensGenerated += n }

    /// Runs a whole `generate` call on the calling thread (no other work interleaves).
    func generate(_ p: Params) throws -> Any {
        let call = try prepareGenerate(p)
        let id = try submit(call)
        while true {
            for done in try generator.step() where done.requestId == id { return generateResult(done, call) }
        }
    }

    /// A parsed `logprob` call; calls with equal temperature and options can share one forward pass.
    public struct ScoreCall: Sendable {
        public var sequences: [ScoredSequence]
        public var temperature: Float
        public var options: GenerationOptions
        /// The LoRA adapter to score under (nil: the base model).
        public var adapter: String?
        public init(sequences: [ScoredSequence], temperature: Float, options: GenerationOptions, adapter: String? = nil) {
            self.sequences = sequences; self.temperature = temperature; self.options = options; self.adapter = adapter
        }
    }

    public func prepareLogprob(_ p: Params) throws -> ScoreCall {
        try p.only(["sequences", "temperature", "top_logprobs", "entropy", "proxy", "probe_tokens", "adapter"])
        let seqs = try p.objects("sequences").map { s -> ScoredSequence in
            try s.only(["tokens", "response_start"])
            return ScoredSequence(tokens: try s.tokens("tokens"), responseStart: try s.int("response_start", min: 1))
        }
        guard !seqs.isEmpty else { throw RPCError.invalidParams(path: "params.sequences", "give at least one sequence") }
        try limit(seqs.reduce(0) { $0 + $1.tokens.count }, "params.sequences")
        let adapter = p.has("adapter") ? try trainer(for: p).adapter!.name : nil
        var options = try options(p)
        let a = model.architecture
        if p.has("probe_tokens") {
            options.probeTokens = try p.tokens("probe_tokens")
            guard options.probeTokens.count <= Self.maxProbeTokens else {
                throw RPCError.invalidParams(path: "params.probe_tokens", "at most \(Self.maxProbeTokens) tokens, got \(options.probeTokens.count)")
            }
            for (i, t) in options.probeTokens.enumerated() where Int(t) >= a.vocabSize {
                throw RPCError.invalidParams(path: "params.probe_tokens[\(i)]", "token \(t) is outside the vocabulary (\(a.vocabSize) tokens)")
            }
        }
        let call = ScoreCall(sequences: seqs, temperature: try p.float("temperature", 1, min: 0), options: options,
                             adapter: adapter)
        do { try Scoring.validate(seqs, vocabSize: a.vocabSize, maxPositions: a.position == .learned ? a.maxPositions : nil) }
        catch { throw Self.translate(error) }
        return call
    }

    /// Scores several calls in one packed forward pass (they must share temperature and options;
    /// each may name its own adapter).
    public func score(_ calls: [ScoreCall]) throws -> [[ScoreResult]] {
        guard let first = calls.first else { return [] }
        let all = calls.flatMap(\.sequences)
        let results: [ScoreResult]
        do {
            var adapters: [LoRAAdapter?] = []
            for c in calls {
                let a = try adapterObject(c.adapter, path: "params.adapter")
                adapters += Array(repeating: a, count: c.sequences.count)
            }
            results = try Scoring.score(model: model, sequences: all, temperature: first.temperature, options: first.options,
                                        adapters: adapters.contains { $0 != nil } ? adapters : nil)
        } catch { throw Self.translate(error) }
        var out: [[ScoreResult]] = [], at = 0
        for c in calls {
            out.append(Array(results[at..<(at + c.sequences.count)]))
            at += c.sequences.count
        }
        return out
    }

    public func logprobResult(_ results: [ScoreResult], _ call: ScoreCall) -> Any {
        tokensScored += call.sequences.reduce(0) { $0 + $1.tokens.count - $1.responseStart }
        let version = call.adapter.flatMap { adapterTrainers[$0]?.weightsVersion } ?? trainer.weightsVersion
        return ["weights_version": version,
                "results": results.map { r -> [String: Any] in
                    var d: [String: Any] = ["logprobs": r.logprobs]
                    if let e = r.entropies { d["entropies"] = e }
                    if let x = r.proxyLogprobs { d["proxy_logprobs"] = x }
                    if let t = r.topLogprobs { d["top_logprobs"] = t.map { $0.map { ["token": Int($0.token), "logprob": $0.logprob] } } }
                    if let x = r.probeLogprobs { d["probe_logprobs"] = x }
                    return d
                }]
    }

    /// The most `probe_tokens` a `logprob` call may name.
    public static let maxProbeTokens = 64

    func logprob(_ p: Params) throws -> Any {
        let call = try prepareLogprob(p)
        return logprobResult(try score([call])[0], call)
    }

    /// `presence_penalty`, `frequency_penalty` (each in [-2, 2]) and `logit_bias` ({token id as a
    /// string or number: bias in [-100, 100]}), as OpenAI and vLLM take them.
    public static func readPenalties(_ p: Params, into s: inout SamplingParams) throws {
        s.presencePenalty = try p.float("presence_penalty", 0, min: -2, max: 2)
        s.frequencyPenalty = try p.float("frequency_penalty", 0, min: -2, max: 2)
        if let bias = try p.object("logit_bias") {
            for key in bias.object.keys.sorted() {
                guard let token = Int32(key), token >= 0 else {
                    throw RPCError.invalidParams(path: "\(bias.path).\(key)", "keys are token ids")
                }
                s.logitBias[token] = try bias.float(key, min: -100, max: 100)
            }
        }
    }
}
