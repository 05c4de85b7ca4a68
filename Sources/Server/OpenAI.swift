// An OpenAI-compatible subset for evaluation harnesses and the OpenAI SDK: `GET /v1/models` and
// `POST /v1/completions` (legacy completions). Prompt as a string, strings, token ids or lists of
// token ids; max_tokens (0 with echo scores the prompt only, as lm-evaluation-harness does),
// temperature, top_p, n, best_of (the n of best_of samples with the highest cumulative
// log-probability, as vLLM ranks them), stop, seed, logprobs (top alternatives, up to 20), echo,
// presence_penalty, frequency_penalty and logit_bias (on the raw logits of the sample's own
// output, as vLLM), `user` (written to the request log), and streaming as server-sent events.
// Extensions as in vLLM: top_k, min_p. Log-probabilities are under the full softmax at the
// sampling temperature (temperature 0 reports at 1), as in the JSON-RPC protocol.
// Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
import Engine
import Foundation
import JSON
import Logging
import RPC

struct OpenAIRoutes: Sendable {
    let scheduler: Scheduler
    let modelName: String
    let logger: Logger

    static let accepted: Set<String> = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs",
                                        "echo", "stream", "stream_options", "user", "top_k", "min_p", "presence_penalty",
                                        "frequency_penalty", "best_of", "logit_bias", "suffix"]

    /// The base model, then every LoRA adapter (as vLLM lists them: `parent` is the base).
    func models() -> HTTPResponse {
        var data: [[String: Any]] = [["id": modelName, "object": "model", "created": 0, "owned_by": "ember", "root": modelName,
                                      "parent": NSNull()]]
        for name in scheduler.gauges.adapters {
            data.append(["id": name, "object": "model", "created": 0, "owned_by": "ember", "root": name, "parent": modelName])
        }
        let body: [String: Any] = ["object": "list", "data": data]
        return HTTPResponse(status: 200, body: JSONRPC.encode(body))
    }

    static func error(_ status: Int, _ message: String, param: String? = nil, type: String = "invalid_request_error") -> HTTPResponse {
        let e: [String: Any] = ["error": ["message": message, "type": type, "param": param as Any? ?? NSNull(), "code": NSNull()]]
        return HTTPResponse(status: status, body: JSONRPC.encode(e))
    }

    /// Parsed request fields that need no tokenizer.
    struct Request: Sendable {
        var prompts: [[Int32]]?
        var texts: [String]?
        var n = 1
        /// Samples drawn per prompt; the best `n` are returned.
        var bestOf = 1
        var user: String?
        /// The LoRA adapter the `model` field names (nil: the base model).
        var adapter: String?
        var modelID = ""
        var maxTokens = 16
        var sampling = SamplingParams()
        var logprobs: Int?
        var echo = false
        var stream = false
        var includeUsage = false
    }

    func parse(_ body: Data) throws -> Request {
        guard let obj = (try? FastJSON.parse(body)) as? [String: Any] else {
            throw RPCError.invalidParams(path: "body", "expected a JSON object")
        }
        let p = try Params(obj, path: "body")
        try p.only(Self.accepted)
        var r = Request()
        (r.modelID, r.adapter) = try resolveModel(p)
        switch obj["prompt"] {
        case let s as String: r.texts = [s]
        case let a as [Any] where a.allSatisfy({ $0 is String }): r.texts = a as? [String]
        case let a as [Any] where !a.isEmpty && a.allSatisfy({ $0 is [Any] }): r.prompts = try p.tokenLists("prompt")
        case is [Any]: r.prompts = [try p.tokens("prompt")]
        default: throw RPCError.invalidParams(path: "prompt", "a string, a list of strings, a list of token ids or a list of such lists")
        }
        guard (r.texts?.count ?? r.prompts?.count ?? 0) >= 1 else { throw RPCError.invalidParams(path: "prompt", "give at least one prompt") }
        r.n = try p.int("n", 1, min: 1, max: 128)
        r.bestOf = try p.int("best_of", r.n, min: r.n, max: 128)
        if p.has("user") { r.user = try p.string("user") }
        r.maxTokens = try p.int("max_tokens", 16, min: 0)
        r.sampling.maxTokens = max(1, r.maxTokens)
        try Self.readSampling(p, into: &r.sampling)
        if p.has("logprobs") { r.logprobs = try p.int("logprobs", min: 0, max: 20) }
        if p.has("suffix") { throw RPCError.invalidParams(path: "suffix", "not supported (insertion needs a model trained for it)") }
        r.echo = try p.bool("echo", false)
        r.stream = try p.bool("stream", false)
        if r.stream && r.bestOf > r.n {
            throw RPCError.invalidParams(path: "best_of", "cannot stream when best_of > n: the best samples are known only at the end")
        }
        if let so = try p.object("stream_options") { r.includeUsage = try so.bool("include_usage", false) }
        if r.maxTokens == 0 && !r.echo { throw RPCError.invalidParams(path: "max_tokens", "0 is only meaningful with echo") }
        return r
    }

    /// An OpenAI-style id: the prefix and 24 random hex digits.
    static func randomID(_ prefix: String) -> String {
        prefix + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased().prefix(24)
    }

    /// The `model` field: the served model's name, or a LoRA adapter's (id, adapter).
    func resolveModel(_ p: Params) throws -> (String, String?) {
        guard p.has("model") else { return (modelName, nil) }
        let m = try p.string("model")
        if m == modelName { return (m, nil) }
        let adapters = scheduler.gauges.adapters
        guard adapters.contains(m) else {
            throw RPCError(.modelNotFound, path: "model",
                           hint: "the model `\(m)` does not exist; GET /v1/models lists " + ([modelName] + adapters).map { "`\($0)`" }.joined(separator: ", "))
        }
        return (m, m)
    }

    /// The sampling fields both OpenAI routes take (max_tokens aside).
    static func readSampling(_ p: Params, into s: inout SamplingParams) throws {
        s.temperature = try p.float("temperature", 1, min: 0, max: 2)
        s.topP = try p.float("top_p", 1)
        s.topK = try p.int("top_k", 0, min: 0)
        s.minP = try p.float("min_p", 0, min: 0, max: 1)
        if p.has("seed") { s.seed = UInt64(bitPattern: Int64(try p.int("seed"))) }
        if p.object["stop"] is String { s.stop = [try p.string("stop")] } else if p.has("stop") { s.stop = try p.strings("stop") }
        try Dispatcher.readPenalties(p, into: &s)
    }

    static func httpError(_ e: RPCError) -> HTTPResponse {
        let status = e.kind.httpStatus
        var message = e.message
        if let hint = e.hint { message += ": \(hint)" }
        var param = e.path
        if let p = param, p.hasPrefix("body.") { param = String(p.dropFirst(5)) }
        return error(status, message, param: param, type: status == 500 ? "server_error" : "invalid_request_error")
    }

    func completions(_ http: HTTPRequest, _ responder: HTTPResponder) {
        let request: Request
        do { request = try parse(http.body) } catch let e as RPCError {
            responder.respond(Self.httpError(e)); return
        } catch { responder.respond(Self.error(400, "\(error)")); return }
        if let user = request.user {
            logger.info("completion", metadata: ["user": "\(user)", "connection": "\(responder.connection)"])
        }
        let id = Self.randomID("cmpl-")
        let created = Int(Date().timeIntervalSince1970)
        let model = request.modelID
        let stream = StreamState(responder: responder, id: id, created: created, model: model)

        let prepare: @Sendable (Dispatcher) throws -> Dispatcher.GenerateCall = { d in
            var prompts = request.prompts ?? []
            if let texts = request.texts {
                let tok = try d.needTokenizer()
                prompts = try texts.map { try tok.encode($0, addSpecialTokens: true) }
            }
            var options = GenerationOptions()
            options.topLogprobs = request.logprobs ?? 0
            return Dispatcher.GenerateCall(prompts: prompts, n: request.bestOf, params: request.sampling, options: options,
                                           adapter: request.adapter)
        }
        let finish: @Sendable (Dispatcher, GenerationResult?, Dispatcher.GenerateCall) throws -> Any = { d, out, call in
            try Self.body(d, out, call, request, id: id, created: created, model: model, stream: stream)
        }
        let completion: Scheduler.Completion = { result in
            switch result {
            case let .success(value):
                if request.stream { stream.end(value as? [String: Any]) }
                else { responder.respond(HTTPResponse(status: 200, body: JSONRPC.encode(value))) }
            case let .failure(e):
                if stream.started { stream.fail(e) } else { responder.respond(Self.httpError(e)) }
            }
        }
        if request.maxTokens == 0 {
            // Echo only: score the prompts, generate nothing.
            scheduler.read(owner: responder.connection, { d in
                let call = try prepare(d)
                if request.stream { stream.echo(d, call.prompts, n: request.n) }
                return try finish(d, nil, call)
            }, completion: completion)
            return
        }
        let onEvent: (@Sendable (Dispatcher, TokenEvent) -> Void)? = request.stream ? { @Sendable d, e in
            stream.event(d, e, n: request.n, logprobs: request.logprobs)
        } : nil
        scheduler.submit(generate: Scheduler.GenerateWork(prepare: { d in
            let call = try prepare(d)
            if request.stream && request.echo {
                stream.echo(d, call.prompts, n: request.n)
            }
            return call
        }, finish: { d, out, call in try finish(d, out, call) }, onEvent: onEvent), owner: responder.connection, completion: completion)
    }

    /// Indices of the `n` samples to return: all of them in order when no more were drawn, else
    /// the `n` with the highest cumulative log-probability (ties: the earlier sample), best first.
    /// nil entries when nothing was generated (echo only).
    static func best(_ samples: [SampleResult]?, n: Int) -> [Int?] {
        guard let samples else { return Array(repeating: nil, count: n) }
        guard samples.count > n else { return Array(samples.indices) }
        let score = samples.map { $0.logprobs.reduce(0.0) { $0 + Double($1) } }
        return Array(samples.indices.sorted { score[$0] > score[$1] || (score[$0] == score[$1] && $0 < $1) }.prefix(n))
    }

    /// The response body (or, when streaming, the final usage figures).
    static func body(_ d: Dispatcher, _ out: GenerationResult?, _ call: Dispatcher.GenerateCall, _ r: Request,
                     id: String, created: Int, model: String, stream: StreamState) throws -> Any {
        let tok = d.tokenizer
        func piece(_ t: Int32) -> String { (try? tok?.decode([t])) ?? nil ?? "<\(t)>" }
        let promptCount = call.prompts.reduce(0) { $0 + $1.count }
        // Every drawn token counts (best_of's unreturned samples too, as OpenAI bills them).
        var completionCount = 0
        for samples in out?.results ?? [] { for sample in samples { completionCount += sample.tokens.count } }
        // Prompt log-probabilities for echo + logprobs (the first token has none).
        var promptScores: [ScoreResult]?
        if r.echo, r.logprobs != nil {
            var o = GenerationOptions()
            o.topLogprobs = r.logprobs ?? 0
            let scorable = call.prompts.map { ScoredSequence(tokens: $0, responseStart: 1) }
            promptScores = try d.score([Dispatcher.ScoreCall(sequences: scorable, temperature: 1, options: o, adapter: call.adapter)])[0]
        }
        var choices: [[String: Any]] = []
        for (p, prompt) in call.prompts.enumerated() {
            for (s, drawn) in Self.best(out?.results[p], n: r.n).enumerated() {
                let sample = drawn.map { out!.results[p][$0] }
                var text = sample?.text ?? ""
                let promptText = r.echo ? ((try? tok?.decode(prompt)) ?? nil ?? "") : ""
                if r.echo && !r.stream { text = promptText + text }
                var choice: [String: Any] = ["index": p * r.n + s, "text": text,
                                             "finish_reason": sample.map { $0.finishReason == .length ? "length" : "stop" } ?? "length"]
                if let k = r.logprobs, !r.stream {
                    var tokens: [String] = [], lps: [Any] = [], tops: [Any] = [], offsets: [Int] = []
                    var offset = 0
                    func add(_ t: Int32, _ lp: Any, _ top: [TokenLogprob]?) {
                        let s = piece(t)
                        tokens.append(s); lps.append(lp); offsets.append(offset)
                        offset += s.count
                        if let top {
                            var m: [String: Float] = [:]
                            for a in top.prefix(k) { m[piece(a.token)] = a.logprob }
                            tops.append(m)
                        } else { tops.append(NSNull()) }
                    }
                    if let scores = promptScores?[p] {
                        add(prompt[0], NSNull(), nil)
                        for (i, t) in prompt.dropFirst().enumerated() { add(t, scores.logprobs[i], k > 0 ? scores.topLogprobs?[i] : nil) }
                    }
                    if let sample {
                        for (i, t) in sample.tokens.enumerated() { add(t, sample.logprobs[i], k > 0 ? sample.topLogprobs?[i] : nil) }
                    }
                    choice["logprobs"] = ["tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets]
                } else {
                    choice["logprobs"] = NSNull()
                }
                choices.append(choice)
            }
        }
        d.countGenerated(completionCount)
        let usage: [String: Any] = ["prompt_tokens": promptCount, "completion_tokens": completionCount,
                                    "total_tokens": promptCount + completionCount]
        return ["id": id, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": usage, "system_fingerprint": "ember-w\(d.trainer.weightsVersion)"]
    }
}

/// One server-sent-event stream of an OpenAI route: chunks as `data:` lines, then `[DONE]`.
/// Sendable by hand: the compute thread and the completion both touch it; `started` is under `lock`.
class SSEStream: @unchecked Sendable {
    let responder: HTTPResponder
    let id: String, created: Int, model: String
    /// The chunks' `object` ("text_completion", "chat.completion.chunk").
    let objectName: String
    let lock = NSLock()
    private(set) var started = false

    init(responder: HTTPResponder, id: String, created: Int, model: String, objectName: String) {
        self.responder = responder; self.id = id; self.created = created; self.model = model; self.objectName = objectName
    }

    private func start() {
        lock.lock(); defer { lock.unlock() }
        if !started { started = true; responder.startStream(contentType: "text/event-stream", headers: [("Cache-Control", "no-cache")]) }
    }

    func send(_ object: [String: Any]) {
        start()
        var data = Data("data: ".utf8)
        data.append(JSONRPC.encode(object))
        data.append(Data("\n\n".utf8))
        responder.send(data)
    }

    func chunk(_ choices: [[String: Any]]) -> [String: Any] {
        ["id": id, "object": objectName, "created": created, "model": model, "choices": choices]
    }

    func done() {
        start()
        responder.send(Data("data: [DONE]\n\n".utf8))
        responder.finish()
    }

    func fail(_ e: RPCError) {
        send(["error": ["message": e.message + (e.hint.map { ": \($0)" } ?? ""), "type": "server_error", "code": NSNull(), "param": NSNull()]])
        done()
    }
}

/// The server-sent-event side of one streaming completion.
final class StreamState: SSEStream, @unchecked Sendable {
    init(responder: HTTPResponder, id: String, created: Int, model: String) {
        super.init(responder: responder, id: id, created: created, model: model, objectName: "text_completion")
    }

    func echo(_ d: Dispatcher, _ prompts: [[Int32]], n: Int) {
        var choices: [[String: Any]] = []
        for (p, prompt) in prompts.enumerated() {
            let text = (try? d.tokenizer?.decode(prompt)) ?? nil ?? ""
            for s in 0..<n { choices.append(["index": p * n + s, "text": text, "logprobs": NSNull(), "finish_reason": NSNull()]) }
        }
        send(chunk(choices))
    }

    func event(_ d: Dispatcher, _ e: TokenEvent, n: Int, logprobs: Int?) {
        guard !e.textDelta.isEmpty || logprobs != nil || e.finish != nil else { return }
        var choice: [String: Any] = ["index": e.promptIndex * n + e.sampleIndex, "text": e.textDelta,
                                     "finish_reason": e.finish.map { $0 == .length ? "length" : "stop" } ?? NSNull()]
        if let k = logprobs {
            let piece = { (t: Int32) in (try? d.tokenizer?.decode([t])) ?? nil ?? "<\(t)>" }
            var top: Any = NSNull()
            if k > 0, let alts = e.top {
                var m: [String: Float] = [:]
                for a in alts.prefix(k) { m[piece(a.token)] = a.logprob }
                top = [m]
            }
            choice["logprobs"] = ["tokens": [piece(e.token)], "token_logprobs": [e.logprob], "top_logprobs": top]
        } else {
            choice["logprobs"] = NSNull()
        }
        send(chunk([choice]))
    }

    func end(_ final: [String: Any]?) {
        if let usage = final?["usage"] { var c = chunk([]); c["usage"] = usage; send(c) }
        done()
    }
}
