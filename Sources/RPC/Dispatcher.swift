// The method table of the protocol core, transport-free: a request goes in, a JSON value or an
// `RPCError` comes out. The server (issue 6) adds HTTP, threads and scheduling around it; tests
// call it directly. Engine errors become JSON-RPC errors with a stable `data.kind` and the
// parameter's path.
import Engine
import Foundation
import Kernels
import Models
import Tokenizer
import Weights

public final class Dispatcher: @unchecked Sendable {
    public let model: TransformerModel
    public let tokenizer: Tokenizer?
    public let generator: Generator
    public let trainer: Trainer
    public let rollouts: RolloutStore
    public static let version = "0.1.0"
    /// Refuses every method that changes state (`--read-only`).
    public var readOnly = false
    /// Folder that checkpoint names resolve in (`--checkpoint-dir`); nil: checkpoints disabled.
    public var checkpointDirectory: String?
    /// Most tokens one call may carry or ask for (prompt + generated for generate, all tokens for
    /// logprob and train_step); beyond it the call is refused with kind `request_too_large`.
    public var maxRequestTokens = 4 << 20
    /// Counters for /metrics.
    public private(set) var tokensGenerated = 0
    public private(set) var tokensScored = 0

    public init(model: TransformerModel, tokenizer: Tokenizer?, slots: Int = 64, capacity: Int = 2048,
                rolloutBudgetBytes: Int = 256 << 20) {
        self.model = model
        self.tokenizer = tokenizer
        generator = Generator(model: model, tokenizer: tokenizer, slots: slots, capacity: capacity)
        trainer = Trainer(model: model)
        rollouts = RolloutStore(budgetBytes: rolloutBudgetBytes)
        generator.rolloutStore = rollouts
    }

    public static let methods = ["server.info", "tokenize", "detokenize", "generate", "logprob", "train_step",
                                 "optimizer.configure", "reference.snapshot", "rollouts.release",
                                 "checkpoint.save", "checkpoint.load", "checkpoint.list", "cancel"]

    /// Methods that change the weights, the optimizer or saved state.
    static let mutating: Set<String> = ["train_step", "optimizer.configure", "reference.snapshot", "checkpoint.save",
                                        "checkpoint.load"]

    /// Runs one call.
    public func call(_ method: String, _ rawParams: Any?) throws -> Any {
        let p = try Params(rawParams)
        if readOnly && Self.mutating.contains(method) && !(method == "train_step" && (try? p.bool("dry_run", false)) == true) {
            throw RPCError.domain(-32011, kind: "read_only", message: "Read-only server", path: "method",
                                  hint: "this server was started with --read-only; \(method) would change state")
        }
        do {
            switch method {
            case "server.info": return serverInfo()
            case "tokenize": return try tokenize(p)
            case "detokenize": return try detokenize(p)
            case "generate": return try generate(p)
            case "logprob": return try logprob(p)
            case "train_step": return try trainStep(p)
            case "optimizer.configure": return try configure(p)
            case "reference.snapshot":
                try trainer.snapshotReference()
                return ["weights_version": trainer.weightsVersion]
            case "rollouts.release":
                try p.only(["rollout_ids"])
                return ["released": rollouts.release(try p.strings("rollout_ids"))]
            case "checkpoint.save": return try checkpointSave(p)
            case "checkpoint.load": return try checkpointLoad(p)
            case "checkpoint.list": return ["names": try checkpointNames()]
            case "cancel":
                // Called directly, nothing runs concurrently; the server's scheduler handles it for real.
                try p.only(["request_id"])
                guard p.has("request_id"), !(p.object["request_id"] is [Any]), !(p.object["request_id"] is [String: Any]) else {
                    throw RPCError.invalidParams(path: "params.request_id", "the id (string or number) of the generate call to cancel")
                }
                return ["cancelled": 0]
            default: throw RPCError.methodNotFound(method)
            }
        } catch let e as RPCError {
            throw e
        } catch {
            throw Self.translate(error)
        }
    }

    /// Engine errors as JSON-RPC errors.
    public static func translate(_ error: Error) -> RPCError {
        switch error {
        case let e as GenerationError:
            switch e {
            case let .contextOverflow(p, _, _):
                return .domain(-32001, kind: "context_overflow", message: "Context overflow", path: "params.prompts[\(p)]", hint: "\(e)")
            case let .invalidParameter(name, reason): return .invalidParams(path: "params.\(name)", reason)
            case let .overloaded(reason): return .domain(-32002, kind: "overloaded", message: "Overloaded", hint: reason)
            }
        case let e as RolloutError:
            switch e {
            case .unknown: return .domain(-32003, kind: "unknown_rollout", message: "Unknown rollout", path: "params.rollouts", hint: "\(e)")
            case .evicted: return .domain(-32003, kind: "evicted_rollout", message: "Evicted rollout", path: "params.rollouts", hint: "\(e)")
            }
        case let e as NonFiniteError:
            return .domain(-32004, kind: "non_finite", message: "Non-finite step refused", hint: "\(e)")
        case let e as TrainError:
            if case let .invalid(path, reason) = e {
                if path.hasPrefix("rollouts[") && reason.contains("rollout") {
                    let kind = reason.contains("evicted") ? "evicted_rollout" : "unknown_rollout"
                    return .domain(-32003, kind: kind, message: "Unknown rollout", path: "params.\(path)", hint: reason)
                }
                return .invalidParams(path: "params.\(path)", reason)
            }
        case let e as ScoringError:
            if case let .invalid(path, reason) = e { return .invalidParams(path: "params.\(path)", reason) }
        case let e as InputError:
            return .invalidParams(path: "params", "\(e)")
        case let e as TokenizerError:
            return .invalidParams(path: "params", "\(e)")
        default: break
        }
        return .internalError("\(error)")
    }

    // MARK: - Methods

    // MARK: - Checkpoints

    /// A checkpoint is a symlink `name` → `name.v<N>` (a Hugging Face folder plus optimizer state);
    /// saving writes a new version and swaps the link with one rename, so a crash mid-save leaves
    /// the previous checkpoint intact.
    func checkpointFolder(_ p: Params) throws -> (dir: String, name: String) {
        guard let dir = checkpointDirectory else {
            throw RPCError.domain(-32012, kind: "checkpoints_disabled", message: "Checkpoints disabled",
                                  hint: "start the server with --checkpoint-dir DIR")
        }
        try p.only(["name"])
        let name = try p.string("name")
        let allowed = name.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) || "._-".unicodeScalars.contains($0) }
        guard allowed, !name.isEmpty, name.count <= 128, !name.hasPrefix("."), !name.contains(".."), !name.contains(".v") else {
            throw RPCError.invalidParams(path: "params.name", "letters, digits, '.', '_' and '-' only (no leading dot, no '..', no '.v'), at most 128 characters")
        }
        return (dir, name)
    }

    func checkpointSave(_ p: Params) throws -> Any {
        let (dir, name) = try checkpointFolder(p)
        let fm = FileManager.default
        let link = dir + "/" + name
        let previous = try? fm.destinationOfSymbolicLink(atPath: link)
        var version = 1
        if let prev = previous, let v = Int(prev.split(separator: "v").last ?? "") { version = v + 1 }
        let target = "\(name).v\(version)"
        // A version folder a crash left unpublished is not a checkpoint: replace it.
        try? fm.removeItem(atPath: dir + "/" + target)
        let tmp = dir + "/.tmp-\(UUID().uuidString)"
        do {
            try fm.createDirectory(atPath: tmp, withIntermediateDirectories: true)
            try model.save(to: tmp)
            try trainer.saveState(to: tmp)
            try Self.syncFolder(tmp)
            try fm.moveItem(atPath: tmp, toPath: dir + "/" + target)
            let tmpLink = dir + "/.tmp-link-\(UUID().uuidString)"
            try fm.createSymbolicLink(atPath: tmpLink, withDestinationPath: target)
            guard rename(tmpLink, link) == 0 else {
                let reason = String(cString: strerror(errno))
                try? fm.removeItem(atPath: tmpLink)
                try? fm.removeItem(atPath: dir + "/" + target)
                throw WeightsError.writeFailed(path: link, reason: reason)
            }
            try? Self.syncFolder(dir)
        } catch {
            try? fm.removeItem(atPath: tmp)
            let kept = previous != nil ? "the previous checkpoint '\(name)' is unchanged" : "nothing was saved"
            throw RPCError.domain(-32014, kind: "checkpoint_failed", message: "Checkpoint not saved", path: "params.name",
                                  hint: "\(error); \(kept) and the server keeps its weights (free disk space, then save again)")
        }
        if let prev = previous { try? fm.removeItem(atPath: dir + "/" + prev) }
        return ["name": name, "weights_version": trainer.weightsVersion]
    }

    /// fsyncs a folder's files and the folder itself, so a published checkpoint survives a power cut.
    static func syncFolder(_ path: String) throws {
        for item in (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? [] {
            let fd = open(path + "/" + item, O_RDONLY)
            if fd >= 0 { defer { close(fd) }; guard fsync(fd) == 0 else { throw WeightsError.writeFailed(path: path + "/" + item, reason: String(cString: strerror(errno))) } }
        }
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        if fd >= 0 { _ = fsync(fd); close(fd) }
    }

    /// Removes what an interrupted save leaves in the checkpoint folder: `.tmp-*` entries and
    /// version folders no name links to. Returns the entries removed.
    @discardableResult
    public func cleanCheckpointDirectory() -> [String] {
        guard let dir = checkpointDirectory else { return [] }
        let fm = FileManager.default
        let items = (try? fm.contentsOfDirectory(atPath: dir)) ?? []
        let linked = Set(items.compactMap { try? fm.destinationOfSymbolicLink(atPath: dir + "/" + $0) })
        var removed: [String] = []
        for item in items {
            let isLink = (try? fm.destinationOfSymbolicLink(atPath: dir + "/" + item)) != nil
            let strayVersion = !isLink && item.range(of: #"\.v[0-9]+$"#, options: .regularExpression) != nil && !linked.contains(item)
            if item.hasPrefix(".tmp-") || strayVersion {
                if (try? fm.removeItem(atPath: dir + "/" + item)) != nil { removed.append(item) }
            }
        }
        return removed
    }

    func checkpointLoad(_ p: Params) throws -> Any {
        let (dir, name) = try checkpointFolder(p)
        guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: dir + "/" + name) else {
            throw RPCError.domain(-32013, kind: "checkpoint_not_found", message: "Checkpoint not found", path: "params.name",
                                  hint: "no checkpoint named '\(name)'; checkpoint.list shows the saved ones")
        }
        let folder = dir + "/" + target
        // Validate everything before touching the live weights.
        let staged = try TransformerModel.load(directory: folder)
        guard staged.parameters.count == model.parameters.count, staged.configJSON == model.configJSON else {
            throw RPCError.invalidParams(path: "params.name", "checkpoint '\(name)' holds a different model")
        }
        model.parameters.values.update(from: staged.parameters.values, count: model.parameters.count)
        model.parameters.markModified()
        try trainer.loadState(from: folder)
        return ["name": name, "weights_version": trainer.weightsVersion]
    }

    func checkpointNames() throws -> [String] {
        guard let dir = checkpointDirectory else { return [] }
        let items = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return items.filter { !$0.hasPrefix(".") && (try? FileManager.default.destinationOfSymbolicLink(atPath: dir + "/" + $0)) != nil }.sorted()
    }

    func serverInfo() -> [String: Any] {
        let a = model.architecture
        return ["name": "ember", "version": Self.version, "weights_version": trainer.weightsVersion,
                "model": ["model_type": a.modelType, "parameters": model.parameterCount, "layers": a.layers,
                          "hidden_size": a.hiddenSize, "vocab_size": a.vocabSize, "max_position_embeddings": a.maxPositions,
                          "heads": a.heads, "kv_heads": a.kvHeads, "head_dim": a.headDim, "tied_embeddings": a.tiedEmbeddings],
                "capabilities": Self.methods]
    }

    public func needTokenizer() throws -> Tokenizer {
        guard let t = tokenizer else {
            throw RPCError.domain(-32005, kind: "no_tokenizer", message: "No tokenizer", hint: "the model folder has no tokenizer.json; send token ids")
        }
        return t
    }

    func tokenize(_ p: Params) throws -> Any {
        try p.only(["text", "texts", "add_special_tokens"])
        let tok = try needTokenizer()
        let special = try p.bool("add_special_tokens", true)
        if p.has("text") { return ["tokens": try tok.encode(try p.string("text"), addSpecialTokens: special).map(Int.init)] }
        guard p.has("texts") else { throw RPCError.invalidParams(path: "params.text", "give text or texts") }
        return ["token_lists": try p.strings("texts").map { try tok.encode($0, addSpecialTokens: special).map(Int.init) }]
    }

    func detokenize(_ p: Params) throws -> Any {
        try p.only(["tokens", "token_lists", "skip_special_tokens"])
        let tok = try needTokenizer()
        let skip = try p.bool("skip_special_tokens", false)
        if p.has("tokens") { return ["text": try tok.decode(try p.tokens("tokens"), skipSpecialTokens: skip)] }
        guard p.has("token_lists") else { throw RPCError.invalidParams(path: "params.tokens", "give tokens or token_lists") }
        return ["texts": try p.tokenLists("token_lists").map { try tok.decode($0, skipSpecialTokens: skip) }]
    }

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
        public init(prompts: [[Int32]], n: Int, params: SamplingParams, options: GenerationOptions) {
            self.prompts = prompts; self.n = n; self.params = params; self.options = options
        }
    }

    public func prepareGenerate(_ p: Params) throws -> GenerateCall {
        try p.only(["prompts", "prompt_tokens", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                    "stop_token_ids", "logprobs", "top_logprobs", "entropy", "proxy", "ignore_eos"])
        var prompts: [[Int32]]
        if p.has("prompt_tokens") {
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
        let call = GenerateCall(prompts: prompts, n: try p.int("n", 1, min: 1), params: s, options: try options(p))
        try limit(prompts.reduce(0) { $0 + $1.count + call.n * s.maxTokens }, "params.max_tokens")
        return call
    }

    func limit(_ tokens: Int, _ path: String) throws {
        guard tokens <= maxRequestTokens else {
            throw RPCError.domain(-32017, kind: "request_too_large", message: "Request too large", path: path,
                                  hint: "the call carries or asks for \(tokens) tokens; this server accepts at most \(maxRequestTokens) per call (--max-request-tokens); split it")
        }
    }

    /// Queues a parsed call on the generator (errors already translated).
    public func submit(_ call: GenerateCall) throws -> Int {
        generator.weightsVersion = trainer.weightsVersion
        do { return try generator.submit(prompts: call.prompts, n: call.n, params: call.params, options: call.options) }
        catch { throw Self.translate(error) }
    }

    /// The JSON result of a finished `generate` call.
    public func generateResult(_ out: GenerationResult, _ call: GenerateCall) -> Any {
        tokensGenerated += out.results.reduce(0) { $0 + $1.reduce(0) { $0 + $1.tokens.count } }
        return ["weights_version": trainer.weightsVersion,
                "results": out.results.enumerated().map { i, samples -> [String: Any] in
                    ["prompt_index": i, "prompt_tokens": out.promptTokens[i].map(Int.init),
                     "samples": samples.map { sample -> [String: Any] in
                         var d: [String: Any] = ["rollout_id": sample.rolloutId ?? NSNull(), "tokens": sample.tokens.map(Int.init),
                                                 "text": sample.text, "finish_reason": sample.finishReason.rawValue]
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
        public init(sequences: [ScoredSequence], temperature: Float, options: GenerationOptions) {
            self.sequences = sequences; self.temperature = temperature; self.options = options
        }
    }

    public func prepareLogprob(_ p: Params) throws -> ScoreCall {
        try p.only(["sequences", "temperature", "top_logprobs", "entropy", "proxy"])
        let seqs = try p.objects("sequences").map { s -> ScoredSequence in
            try s.only(["tokens", "response_start"])
            return ScoredSequence(tokens: try s.tokens("tokens"), responseStart: try s.int("response_start", min: 1))
        }
        guard !seqs.isEmpty else { throw RPCError.invalidParams(path: "params.sequences", "give at least one sequence") }
        try limit(seqs.reduce(0) { $0 + $1.tokens.count }, "params.sequences")
        let call = ScoreCall(sequences: seqs, temperature: try p.float("temperature", 1, min: 0), options: try options(p))
        let a = model.architecture
        do { try Scoring.validate(seqs, vocabSize: a.vocabSize, maxPositions: a.position == .learned ? a.maxPositions : nil) }
        catch { throw Self.translate(error) }
        return call
    }

    /// Scores several calls in one packed forward pass (they must share temperature and options).
    public func score(_ calls: [ScoreCall]) throws -> [[ScoreResult]] {
        guard let first = calls.first else { return [] }
        let all = calls.flatMap(\.sequences)
        let results: [ScoreResult]
        do { results = try Scoring.score(model: model, sequences: all, temperature: first.temperature, options: first.options) }
        catch { throw Self.translate(error) }
        var out: [[ScoreResult]] = [], at = 0
        for c in calls {
            out.append(Array(results[at..<(at + c.sequences.count)]))
            at += c.sequences.count
        }
        return out
    }

    public func logprobResult(_ results: [ScoreResult], _ call: ScoreCall) -> Any {
        tokensScored += call.sequences.reduce(0) { $0 + $1.tokens.count - $1.responseStart }
        return ["weights_version": trainer.weightsVersion,
                "results": results.map { r -> [String: Any] in
                    var d: [String: Any] = ["logprobs": r.logprobs]
                    if let e = r.entropies { d["entropies"] = e }
                    if let x = r.proxyLogprobs { d["proxy_logprobs"] = x }
                    if let t = r.topLogprobs { d["top_logprobs"] = t.map { $0.map { ["token": Int($0.token), "logprob": $0.logprob] } } }
                    return d
                }]
    }

    func logprob(_ p: Params) throws -> Any {
        let call = try prepareLogprob(p)
        return logprobResult(try score([call])[0], call)
    }

    func clip(_ l: Params, low: Float, high: Float) throws -> ClipOptions {
        ClipOptions(epsLow: try l.float("eps_low", low, min: 0), epsHigh: try l.float("eps_high", high, min: 0),
                    dualClip: l.has("dual_clip") ? try l.float("dual_clip", min: 1) : nil)
    }

    func lossConfig(_ p: Params) throws -> LossConfig {
        guard let l = try p.object("loss") else { throw RPCError.invalidParams(path: "params.loss", "required (loss.mode)") }
        let mode = try l.string("mode", oneOf: ["lp_reg", "ppo", "gspo", "clip_cov", "kl_cov", "high_entropy", "cispo", "cross_entropy"])
        let lossMode: LossMode
        switch mode {
        case "ppo": lossMode = .ppo(try clip(l, low: 0.2, high: 0.2))
        case "gspo": lossMode = .gspo(try clip(l, low: 0.0003, high: 0.0004))
        case "cispo": lossMode = .cispo(try clip(l, low: 1.0, high: 0.2))
        case "high_entropy": lossMode = .highEntropy(fraction: try l.float("fraction", 0.2, min: 0, max: 1), clip: try clip(l, low: 0.2, high: 0.2))
        case "clip_cov":
            var o = ClipCovOptions()
            o.clip = try clip(l, low: 0.2, high: 0.2)
            o.ratio = try l.float("ratio", 0.0002, min: 0, max: 1)
            o.covLow = try l.float("cov_low", 1)
            o.covHigh = try l.float("cov_high", 5)
            lossMode = .clipCov(o)
        case "kl_cov":
            var o = KLCovOptions()
            o.ratio = try l.float("ratio", 0.0002, min: 0, max: 1)
            o.coef = try l.float("coef", 1)
            lossMode = .klCov(o)
        case "lp_reg":
            var o = LpRegOptions()
            o.clip = try clip(l, low: 1.0, high: 9.0)
            if l.has("threshold") { o.proxy = .threshold(try l.float("threshold", min: 0, max: 1)) }
            else { o.proxy = .minP(try l.float("min_p", 0.02, min: 0, max: 1)) }
            o.rho = try l.float("rho", 0.01, min: 0, max: 1)
            o.rhoPos = try l.float("rho_pos", 0, min: 0, max: 1)
            o.beta = try l.float("beta", 1)
            o.kl = try l.string("kl", "k3", oneOf: ["k3", "full"]) == "full" ? .full : .k3
            o.selection = try l.string("selection", "batch", oneOf: ["batch", "micro_batch"]) == "batch" ? .batch : .microBatch
            o.percentileOver = try l.string("percentile_over", "negative", oneOf: ["negative", "all"]) == "all" ? .all : .negative
            o.skipWhenKAtMostOne = try l.bool("skip_k_le_1", true)
            lossMode = .lpReg(o)
        default: lossMode = .crossEntropy
        }
        var c = LossConfig(mode: lossMode)
        c.aggregation = Aggregation(rawValue: try l.string("agg", "token-mean", oneOf: Aggregation.allCases.map(\.rawValue)))!
        c.temperature = try l.float("temperature", 1, min: 0)
        c.entropyCoef = try l.float("entropy_coef", 0)
        c.klCoef = try l.float("kl_coef", 0, min: 0)
        c.klType = ReferenceKL(rawValue: try l.string("kl_type", "k3", oneOf: ["k1", "k2", "k3"]))!
        return c
    }

    func adamW(_ o: Params, base: AdamWSettings) throws -> AdamWSettings {
        var s = base
        s.lr = try o.float("lr", base.lr, min: 0)
        if o.has("betas") {
            let b = try o.floats("betas")
            guard b.count == 2 else { throw RPCError.invalidParams(path: "\(o.path).betas", "expected [beta1, beta2]") }
            s.beta1 = b[0]; s.beta2 = b[1]
        }
        s.eps = try o.float("eps", base.eps, min: 0)
        s.weightDecay = try o.float("weight_decay", base.weightDecay, min: 0)
        s.gradClip = try o.float("grad_clip", base.gradClip, min: 0)
        return s
    }

    func configure(_ p: Params) throws -> Any {
        try p.only(["lr", "betas", "eps", "weight_decay", "grad_clip", "schedule"])
        let s = try adamW(p, base: trainer.optimizer.settings)
        if let sched = try p.object("schedule") {
            let type = try sched.string("type", oneOf: ["constant", "linear_warmup", "cosine"])
            switch type {
            case "linear_warmup": trainer.schedule = .linearWarmup(warmupSteps: try sched.int("warmup_steps", min: 0))
            case "cosine": trainer.schedule = .cosine(warmupSteps: try sched.int("warmup_steps", 0, min: 0),
                                                       totalSteps: try sched.int("total_steps", min: 1),
                                                       minLR: try sched.float("min_lr", 0, min: 0))
            default: trainer.schedule = .constant
            }
        }
        trainer.optimizer.settings = s
        return ["lr": s.lr, "betas": [s.beta1, s.beta2], "eps": s.eps, "weight_decay": s.weightDecay, "grad_clip": s.gradClip]
    }

    func trainStep(_ p: Params) throws -> Any {
        try p.only(["batch", "rollouts", "advantage_estimator", "drop_constant_groups", "loss", "optimizer",
                    "mini_batches", "micro_batch_tokens", "dry_run"])
        let config = try lossConfig(p)
        var proxy: ProxySpec?
        if case let .lpReg(o) = config.mode { proxy = o.proxy }
        var items: [TrainItem] = []
        if p.has("batch") {
            for b in try p.objects("batch") {
                try b.only(["tokens", "response_start", "advantage", "old_logprobs", "proxy_logprobs", "ref_logprobs"])
                let tokens = try b.tokens("tokens")
                let start = try b.int("response_start", min: 1)
                let n = max(0, tokens.count - start)
                let advantages: [Float]
                if b.object["advantage"] is [Any] { advantages = try b.floats("advantage") }
                else { advantages = Array(repeating: try b.float("advantage", config.mode == .crossEntropy ? 0 : nil), count: n) }
                items.append(TrainItem(tokens: tokens, responseStart: start, advantages: advantages,
                                       oldLogprobs: b.has("old_logprobs") ? try b.floats("old_logprobs") : nil,
                                       proxyLogprobs: b.has("proxy_logprobs") ? try b.floats("proxy_logprobs") : nil,
                                       refLogprobs: b.has("ref_logprobs") ? try b.floats("ref_logprobs") : nil))
            }
        }
        if p.has("rollouts") {
            let refs = try p.objects("rollouts").map { r -> RolloutReward in
                try r.only(["rollout_id", "reward", "group"])
                return RolloutReward(rolloutId: try r.string("rollout_id"), reward: Double(try r.float("reward")),
                                     group: r.has("group") ? (r.object["group"] as? String ?? "\(r.object["group"]!)") : nil)
            }
            let estimator = AdvantageEstimator(rawValue: try p.string("advantage_estimator", "grpo", oneOf: AdvantageEstimator.allCases.map(\.rawValue)))!
            items += try Trainer.items(from: refs, store: rollouts, estimator: estimator, temperature: config.temperature,
                                       proxy: proxy, dropConstantGroups: try p.bool("drop_constant_groups", false))
        }
        guard !items.isEmpty else { throw RPCError.invalidParams(path: "params.batch", "give batch items or rollouts") }
        try limit(items.reduce(0) { $0 + $1.tokens.count }, p.has("batch") ? "params.batch" : "params.rollouts")
        let override = try p.object("optimizer").map { try adamW($0, base: trainer.optimizer.settings) }
        let m = try trainer.step(items: items, config: config, miniBatches: try p.int("mini_batches", 1, min: 1),
                                 microBatchTokens: p.has("micro_batch_tokens") ? try p.int("micro_batch_tokens", min: 1) : nil,
                                 optimizer: override, dryRun: try p.bool("dry_run", false))
        var metrics: [String: Any] = [
            "loss": m.loss, "pg_loss": m.pgLoss, "entropy": m.entropy, "clipfrac_low": m.clipFracLow,
            "clipfrac_high": m.clipFracHigh, "ppo_kl": m.ppoKL, "kl_ref": m.refKL, "grad_norm": m.gradNorm, "lr": m.lr,
            "tokens": m.tokens, "lp_reg_selected": m.lpRegSelected, "lp_reg_regularized": m.lpRegRegularized,
            "logprob_max_abs_diff": m.logprobMaxAbsDiff, "optimizer_steps": m.optimizerSteps,
            "seconds_forward": m.secondsForward, "seconds_backward": m.secondsBackward, "seconds_optimizer": m.secondsOptimizer,
        ]
        if let t = m.lpRegThreshold { metrics["lp_reg_threshold"] = t }
        return ["weights_version": trainer.weightsVersion, "metrics": metrics]
    }
}
