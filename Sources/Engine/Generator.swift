// Long on purpose (~480 lines): the continuous-batching state (waiting groups, running samples, slots) is private to one type, and splitting it would make that state internal.
// Batched generation with continuous batching: every `step()` admits waiting prompts into free KV
// slots (prefilled in the same forward pass as the running sequences' next tokens), then samples
// one token for every running sequence. The prompt of an `n`-sample request is prefilled once and
// its cache copied to the other samples' slots. Per token it records the log-probability under the
// full softmax at the sampling temperature, and optionally entropy, Lp-Reg proxy log-probability
// and top alternatives, all through `RowDistribution` (the same code scoring and training use).
import Foundation
import Kernels
import Models
import Tokenizer

public enum FinishReason: String, Sendable, Codable {
    /// A stop string or stop token id.
    case stop
    /// The model's end-of-sequence token.
    case eos
    /// `max_tokens` reached (or the KV slot is full).
    case length
    case cancelled
}

/// What to record per sampled token besides its id.
public struct GenerationOptions: Sendable, Equatable {
    public var logprobs = true
    public var topLogprobs = 0
    public var entropy = false
    public var proxy: ProxySpec? = nil
    /// `logprob` only: tokens whose log-probability is reported at every scored position (for
    /// following a token where it was not taken, such as a study's spark).
    public var probeTokens: [Int32] = []
    /// Record a `TokenEvent` per sampled token (for streaming responses).
    public var events = false
    public init() {}
}

/// One sampled token of a request that asked for events: its id and log-probability, the text it
/// completes (held back while it could still be the start of a stop string), and the finish.
public struct TokenEvent: Sendable {
    public let requestId: Int
    public let promptIndex: Int
    public let sampleIndex: Int
    public let token: Int32
    public let logprob: Float
    /// Top alternatives when the request asked for them.
    public let top: [TokenLogprob]?
    public let textDelta: String
    public let finish: FinishReason?
}

/// One finished sample.
public struct SampleResult: Sendable {
    public var rolloutId: String?
    public var tokens: [Int32]
    public var text: String
    public var logprobs: [Float]
    public var entropies: [Float]?
    public var proxyLogprobs: [Float]?
    public var topLogprobs: [[TokenLogprob]]?
    public var finishReason: FinishReason
    /// The weights every token of the sample was drawn under.
    public var weightsVersion: Int
}

public struct TokenLogprob: Sendable, Equatable {
    public let token: Int32
    public let logprob: Float
}

/// All samples of one request, grouped by prompt.
public struct GenerationResult: Sendable {
    public let requestId: Int
    /// results[p] = samples of prompt p, in sample order.
    public var results: [[SampleResult]]
    public let promptTokens: [[Int32]]
}

public enum GenerationError: Error, CustomStringConvertible, Equatable {
    case contextOverflow(promptIndex: Int, needed: Int, capacity: Int)
    case invalidParameter(name: String, reason: String)
    case overloaded(String)

    public var description: String {
        switch self {
        case let .contextOverflow(p, n, c):
            "prompt \(p) needs \(n) positions (prompt + max_tokens) but a sequence holds at most \(c)"
        case let .invalidParameter(n, r): "\(n): \(r)"
        case let .overloaded(r): r
        }
    }
}

/// Not Sendable: one thread drives it (the server's compute thread).
public final class Generator {
    public let model: TransformerModel
    public let tokenizer: Tokenizer?
    public let cache: KVCache
    /// Where finished samples are recorded (and get their rollout ids), if anywhere.
    public let rolloutStore: RolloutStore?
    /// Most sequences (prompts × n) allowed to wait for a KV slot; a request beyond it is
    /// refused as `overloaded` instead of queueing without bound.
    public let maxQueuedSequences: Int
    /// Logits per thread below which a step's rows are sampled on one thread (a row's draw,
    /// statistics and stop checks are the same whichever thread runs them).
    public let parallelSamplingMinLogits: Int

    private var freeSlots: [Int]
    private var waiting: [PromptGroup] = []
    private var running: [Running] = []
    private var requests: [Int: RequestState] = [:]
    private var nextRequestId = 1
    private var events: [TokenEvent] = []

    /// `slots` sequences of at most `capacity` tokens (prompt + generated) at once.
    public init(model: TransformerModel, tokenizer: Tokenizer?, slots: Int, capacity: Int, rolloutStore: RolloutStore? = nil,
                maxQueuedSequences: Int = .max, parallelSamplingMinLogits: Int = 16_384) {
        self.model = model
        self.tokenizer = tokenizer
        self.rolloutStore = rolloutStore
        self.maxQueuedSequences = maxQueuedSequences
        self.parallelSamplingMinLogits = parallelSamplingMinLogits
        cache = KVCache(architecture: model.architecture, slots: slots, capacity: capacity)
        freeSlots = Array((0..<slots).reversed())
        model.cachesPackedWeights = true
    }

    /// Bytes of the KV cache (allocated once; bounded by slots × capacity).
    public var kvCacheBytes: Int { cache.byteCount }
    /// Bytes of the KV cache held by running sequences.
    public var kvBytesInUse: Int { (cache.slots - freeSlots.count) * cache.byteCount / max(1, cache.slots) }
    public var isIdle: Bool { waiting.isEmpty && running.isEmpty }
    public var runningCount: Int { running.count }
    public var waitingCount: Int { waiting.count }
    /// Sequences (prompts × n) waiting for a KV slot.
    public var queuedSequences: Int { waiting.reduce(0) { $0 + $1.n } }

    // MARK: - Requests

    /// Queues a request; its prompts join the running batch at the next steps with free slots.
    /// `weightsVersion` is recorded with its rollouts (the weights cannot change while it runs).
    /// `adapter`, when given, is the LoRA adapter every sample of the request is drawn under
    /// (rows of other requests in the same step may use other adapters or none).
    public func submit(prompts: [[Int32]], n: Int = 1, params: SamplingParams,
                       options: GenerationOptions = GenerationOptions(), weightsVersion: Int = 0,
                       adapter: LoRAAdapter? = nil) throws -> Int {
        guard !prompts.isEmpty else { throw GenerationError.invalidParameter(name: "prompts", reason: "at least one prompt") }
        guard n >= 1 else { throw GenerationError.invalidParameter(name: "n", reason: "must be at least 1") }
        guard n <= cache.slots else {
            throw GenerationError.overloaded("n = \(n) exceeds the \(cache.slots) concurrent sequences this server holds")
        }
        guard params.maxTokens >= 1 else { throw GenerationError.invalidParameter(name: "max_tokens", reason: "must be at least 1") }
        guard params.temperature >= 0, params.temperature.isFinite else {
            throw GenerationError.invalidParameter(name: "temperature", reason: "must be a finite number >= 0")
        }
        guard params.topP > 0, params.topP <= 1 else { throw GenerationError.invalidParameter(name: "top_p", reason: "must be in (0, 1]") }
        guard params.minP >= 0, params.minP <= 1 else { throw GenerationError.invalidParameter(name: "min_p", reason: "must be in [0, 1]") }
        guard params.topK >= 0 else { throw GenerationError.invalidParameter(name: "top_k", reason: "must be >= 0") }
        for (name, value) in [("presence_penalty", params.presencePenalty), ("frequency_penalty", params.frequencyPenalty)]
        where !(value >= -2 && value <= 2) {
            throw GenerationError.invalidParameter(name: name, reason: "must be in [-2, 2]")
        }
        let V0 = model.architecture.vocabSize
        for (token, bias) in params.logitBias {
            guard token >= 0, Int(token) < V0 else {
                throw GenerationError.invalidParameter(name: "logit_bias", reason: "token \(token) is outside the vocabulary (0..<\(V0))")
            }
            guard bias >= -100, bias <= 100 else {
                throw GenerationError.invalidParameter(name: "logit_bias.\(token)", reason: "must be in [-100, 100]")
            }
        }
        guard options.topLogprobs >= 0, options.topLogprobs <= 20 else {
            throw GenerationError.invalidParameter(name: "top_logprobs", reason: "must be in 0...20")
        }
        if !params.stop.isEmpty && tokenizer == nil {
            throw GenerationError.invalidParameter(name: "stop", reason: "stop strings need a tokenizer")
        }
        if params.stop.contains(where: { $0.isEmpty }) {
            throw GenerationError.invalidParameter(name: "stop", reason: "stop strings must not be empty")
        }
        if case let .minP(k)? = options.proxy, !(k > 0 && k <= 1) {
            throw GenerationError.invalidParameter(name: "proxy.min_p", reason: "must be in (0, 1]")
        }
        if case let .threshold(t)? = options.proxy, !(t > 0 && t <= 1) {
            throw GenerationError.invalidParameter(name: "proxy.threshold", reason: "must be in (0, 1]")
        }
        let V = model.architecture.vocabSize
        for (p, prompt) in prompts.enumerated() {
            guard !prompt.isEmpty else {
                throw GenerationError.invalidParameter(name: "prompts[\(p)]", reason: "a prompt needs at least one token")
            }
            if let bad = prompt.first(where: { $0 < 0 || Int($0) >= V }) {
                throw GenerationError.invalidParameter(name: "prompts[\(p)]", reason: "token \(bad) is outside the vocabulary (0..<\(V))")
            }
            let needed = prompt.count + params.maxTokens
            if needed > cache.capacity || (model.architecture.position == .learned && needed > model.architecture.maxPositions) {
                throw GenerationError.contextOverflow(promptIndex: p, needed: needed,
                    capacity: min(cache.capacity, model.architecture.position == .learned ? model.architecture.maxPositions : Int.max))
            }
        }
        let queued = queuedSequences
        if queued + prompts.count * n > maxQueuedSequences {
            throw GenerationError.overloaded("\(queued) sequences already wait for the \(cache.slots) KV-cache slots and this request adds "
                + "\(prompts.count * n); the queue holds at most \(maxQueuedSequences) (--max-queued-sequences): retry later")
        }
        if let store = rolloutStore {
            // Every sample becomes a rollout; a request whose own rollouts cannot fit in the store
            // would see its first ones evicted before it could use them.
            let perToken = 4 + 4 + (options.proxy == nil ? 0 : 4)
            let need = prompts.reduce(0) { $0 + n * (Rollout.fixedBytes + $1.count * 4 + params.maxTokens * perToken) }
            if need > store.budgetBytes {
                throw GenerationError.overloaded("this request's rollouts may need \(need) bytes, more than the rollout store's budget of "
                    + "\(store.budgetBytes) bytes (--rollout-budget-mb): lower n, max_tokens or the number of prompts")
            }
        }
        let id = nextRequestId
        nextRequestId += 1
        let baseSeed = params.seed ?? UInt64.random(in: 0...UInt64.max)
        requests[id] = RequestState(results: prompts.map { _ in Array(repeating: nil, count: n) }, prompts: prompts)
        for (p, prompt) in prompts.enumerated() {
            waiting.append(PromptGroup(requestId: id, promptIndex: p, prompt: prompt, n: n, params: params,
                                       options: options, seed: baseSeed, weightsVersion: weightsVersion, adapter: adapter))
        }
        return id
    }

    /// Cancels a request: waiting prompts are dropped, running samples finish as `cancelled`
    /// and their slots are freed. Returns false for an unknown id.
    @discardableResult
    public func cancel(_ requestId: Int) -> Bool {
        guard requests[requestId] != nil else { return false }
        waiting.removeAll { $0.requestId == requestId }
        requests[requestId] = nil
        for r in running where r.requestId == requestId { freeSlots.append(r.slot) }
        running.removeAll { $0.requestId == requestId }
        return true
    }

    /// Events recorded since the last call (requests with `options.events` only).
    public func takeEvents() -> [TokenEvent] {
        defer { events = [] }
        return events
    }

    /// Runs `submit` and steps until that request completes.
    public func generate(prompts: [[Int32]], n: Int = 1, params: SamplingParams,
                         options: GenerationOptions = GenerationOptions()) throws -> GenerationResult {
        let id = try submit(prompts: prompts, n: n, params: params, options: options)
        while true {
            for done in try step() where done.requestId == id { return done }
        }
    }

    // MARK: - Stepping

    /// Admits waiting prompts into free slots, runs one forward pass over every new prompt and
    /// every running sequence's last token, and samples one token per sequence. Returns the
    /// requests that completed.
    public func step() throws -> [GenerationResult] {
        try Compute.spinning { try stepInScope() }
    }

    private func stepInScope() throws -> [GenerationResult] {
        var tokens: [Int32] = [], positions: [Int32] = [], slots: [Int32] = []
        var rows: [Int] = []
        var rowOwners: [RowOwner] = []
        var tokenAdapters: [LoRAAdapter?] = []

        // Admit whole prompt groups while slots last (first come, first served).
        while let g = waiting.first, freeSlots.count >= g.n {
            waiting.removeFirst()
            let groupSlots = (0..<g.n).map { _ in freeSlots.removeLast() }
            for (t, tok) in g.prompt.enumerated() {
                tokens.append(tok); positions.append(Int32(t)); slots.append(Int32(groupSlots[0]))
            }
            tokenAdapters += Array(repeating: g.adapter, count: g.prompt.count)
            rows.append(tokens.count - 1)
            var members: [Running] = []
            for s in 0..<g.n {
                members.append(Running(group: g, sample: s, slot: groupSlots[s], tokenizer: tokenizer))
            }
            rowOwners.append(.prefill(members, source: groupSlots[0]))
        }
        // Running sequences feed their last sampled token.
        for r in running {
            tokens.append(r.generated.last!)
            positions.append(Int32(r.group.prompt.count + r.generated.count - 1))
            slots.append(Int32(r.slot))
            tokenAdapters.append(r.group.adapter)
            rows.append(tokens.count - 1)
            rowOwners.append(.decode(r))
        }
        if tokens.isEmpty { return [] }

        let acts = try model.forward(tokens: tokens, positions: positions, context: .cache(cache, slots: slots),
                                     adapters: AdapterRows(perToken: tokenAdapters))
        let V = model.architecture.vocabSize
        var finished: [Running] = []
        var admitted: [Running] = []
        model.withLogitChunks(hidden: acts.hidden.pointer, rows: rows, chunkRows: model.defaultChunkRows()) { range, logits in
            // Rows are independent (each sample owns its random stream, its statistics and its
            // cache slot), so they are drawn in parallel; a row's result does not depend on the split.
            parallelFor(range.count, minPerThread: max(1, parallelSamplingMinLogits / V)) { i in
                let row = logits + i * V
                switch rowOwners[range.lowerBound + i] {
                case let .prefill(members, source):
                    for m in members where m.slot != source {
                        cache.copyPrefix(from: source, to: m.slot, count: m.group.prompt.count)
                    }
                    let dist = RowDistribution(scaling: row, count: V, temperature: members[0].group.params.temperature)
                    for m in members { m.accept(dist) }
                case let .decode(m):
                    m.accept(RowDistribution(scaling: row, count: V, temperature: m.group.params.temperature))
                }
            }
            for r in range {
                switch rowOwners[r] {
                case let .prefill(members, _):
                    for m in members {
                        if m.finish != nil { finished.append(m) } else { admitted.append(m) }
                    }
                case let .decode(m):
                    if m.finish != nil { finished.append(m) }
                }
            }
        }
        running.removeAll { $0.finish != nil }
        running.append(contentsOf: admitted)
        // A sequence whose slot is full stops with `length`.
        for r in running where r.group.prompt.count + r.generated.count >= cache.capacity {
            r.finish = .length
            finished.append(r)
        }
        running.removeAll { $0.finish != nil }
        for case let .decode(m) in rowOwners where m.group.options.events { events.append(m.event()) }
        for case let .prefill(members, _) in rowOwners where members[0].group.options.events {
            for m in members { events.append(m.event()) }
        }

        var completed: [GenerationResult] = []
        for f in finished {
            freeSlots.append(f.slot)
            guard var state = requests[f.requestId] else { continue }
            var result = f.result()
            if let store = rolloutStore {
                result.rolloutId = store.add(Rollout(tokens: f.group.prompt + f.generated, responseStart: f.group.prompt.count,
                                                     logprobs: f.logprobs, proxyLogprobs: f.proxyLogprobs,
                                                     temperature: f.group.params.temperature, proxy: f.group.options.proxy,
                                                     weightsVersion: f.group.weightsVersion, adapter: f.group.adapter?.name))
            }
            state.results[f.group.promptIndex][f.sampleIndex] = result
            requests[f.requestId] = state
            if state.results.allSatisfy({ $0.allSatisfy { $0 != nil } }) {
                completed.append(GenerationResult(requestId: f.requestId, results: state.results.map { $0.map { $0! } },
                                                  promptTokens: state.prompts))
                requests[f.requestId] = nil
            }
        }
        return completed
    }

    // MARK: - State

    private struct PromptGroup {
        let requestId: Int
        let promptIndex: Int
        let prompt: [Int32]
        let n: Int
        let params: SamplingParams
        let options: GenerationOptions
        let seed: UInt64
        let weightsVersion: Int
        let adapter: LoRAAdapter?
    }

    private struct RequestState {
        var results: [[SampleResult?]]
        let prompts: [[Int32]]
    }

    private enum RowOwner {
        case prefill([Running], source: Int)
        case decode(Running)
    }

    /// One running sample.
    private final class Running {
        let group: PromptGroup
        let sampleIndex: Int
        let slot: Int
        var requestId: Int { group.requestId }
        var rng: SequenceRandom
        var generated: [Int32] = []
        var logprobs: [Float] = []
        var entropies: [Float] = []
        var proxyLogprobs: [Float] = []
        var tops: [[TokenLogprob]] = []
        /// Times each token was produced, and a row to shift (penalties and logit bias only).
        var counts: [Int32: Int] = [:]
        var shiftedRow: [Float] = []
        var finish: FinishReason?
        var stream: StreamingDecoder?
        var text = ""
        let eos: Set<Int32>
        let maxStop: Int

        init(group: PromptGroup, sample: Int, slot: Int, tokenizer: Tokenizer?) {
            self.group = group
            sampleIndex = sample
            self.slot = slot
            // Each (request seed, prompt, sample) has its own stream.
            rng = SequenceRandom(seed: group.seed &+ UInt64(group.promptIndex) &* 0x1_0000_0001 &+ UInt64(sample) &* 0x9E37_79B9)
            stream = tokenizer?.makeStreamingDecoder(skipSpecialTokens: true)
            eos = group.params.ignoreEOS ? [] : Set(tokenizer?.eosTokenIds ?? [])
            maxStop = group.params.stop.map { $0.count }.max() ?? 0
        }

        /// Samples the next token from `dist` and records its statistics and finish state.
        func accept(_ dist: RowDistribution) {
            let token: Int32
            if group.params.shiftsLogits {
                if shiftedRow.count != dist.count { shiftedRow = [Float](repeating: 0, count: dist.count) }
                token = shiftedRow.withUnsafeMutableBufferPointer { row in
                    group.params.shifted(dist.z, count: dist.count, counts: counts, into: row.baseAddress!)
                    return Sampler.draw(RowDistribution(scaling: row.baseAddress!, count: dist.count, temperature: 1), group.params, &rng)
                }
                counts[token, default: 0] += 1
            } else {
                token = Sampler.draw(dist, group.params, &rng)
            }
            generated.append(token)
            let o = group.options
            logprobs.append(dist.logprob(Int(token)))
            if o.entropy { entropies.append(dist.entropy()) }
            if let p = o.proxy { proxyLogprobs.append(dist.proxyLogprob(Int(token), p)) }
            if o.topLogprobs > 0 { tops.append(dist.top(o.topLogprobs).map { TokenLogprob(token: $0.token, logprob: $0.logprob) }) }
            if eos.contains(token) { finish = .eos; return }
            if group.params.stopTokenIds.contains(token) { finish = .stop; return }
            if var s = stream {
                let before = text.count
                text += (try? s.append(token)) ?? ""
                stream = s
                if maxStop > 0, let cut = stopMatch(searchFrom: max(0, before - maxStop + 1)) {
                    text = String(text[..<cut])
                    finish = .stop
                    return
                }
            }
            if generated.count >= group.params.maxTokens { finish = .length }
        }

        /// Start of the earliest stop string found at or after character `from`.
        private func stopMatch(searchFrom from: Int) -> String.Index? {
            let start = text.index(text.startIndex, offsetBy: min(from, text.count))
            var best: String.Index?
            for s in group.params.stop {
                if let r = text.range(of: s, range: start..<text.endIndex), best == nil || r.lowerBound < best! {
                    best = r.lowerBound
                }
            }
            return best
        }

        /// Characters of `text` already reported through events.
        var reported = 0

        /// The token just accepted as an event; text is held back while it could begin a stop string.
        func event() -> TokenEvent {
            var delta = ""
            let full = finish == nil ? text : result().text
            let safe = finish == nil ? max(reported, full.count - max(0, maxStop - 1)) : full.count
            if safe > reported {
                let a = full.index(full.startIndex, offsetBy: reported), b = full.index(full.startIndex, offsetBy: safe)
                delta = String(full[a..<b])
                reported = safe
            }
            return TokenEvent(requestId: requestId, promptIndex: group.promptIndex, sampleIndex: sampleIndex,
                              token: generated.last!, logprob: logprobs.last!,
                              top: group.options.topLogprobs > 0 ? tops.last : nil, textDelta: delta, finish: finish)
        }

        func result() -> SampleResult {
            var finalText = text
            if finish != .stop, var s = stream { finalText += s.finish() }
            return SampleResult(rolloutId: nil, tokens: generated, text: finalText,
                                logprobs: logprobs, entropies: group.options.entropy ? entropies : nil,
                                proxyLogprobs: group.options.proxy != nil ? proxyLogprobs : nil,
                                topLogprobs: group.options.topLogprobs > 0 ? tops : nil,
                                finishReason: finish ?? .length, weightsVersion: group.weightsVersion)
        }
    }
}
