// POST /v1/chat/completions: OpenAI's chat API over the model's chat template. The conversation
// (key order kept) is rendered on the compute thread by the same code as chat.render, sampled by
// the generator like any other request, and the answer split into reasoning_content (thinking
// models' <think> block), content and tool_calls (Hermes-style <tool_call> JSON as Qwen writes
// it, or a bare Llama 3 JSON call). Tool JSON the model got wrong comes back as content with
// the parse failure reported, never as an error.
import Chat
import Engine
import Foundation
import JSON
import RPC

extension OpenAIRoutes {
    static let chatAccepted: Set<String> = ["model", "messages", "n", "temperature", "top_p", "top_k", "min_p", "max_tokens",
                                            "max_completion_tokens", "stop", "seed", "logprobs", "top_logprobs", "stream",
                                            "stream_options", "tools", "tool_choice", "parallel_tool_calls", "presence_penalty",
                                            "frequency_penalty", "logit_bias", "user", "chat_template_kwargs", "response_format",
                                            // Accepted and ignored, as vLLM does: bookkeeping fields of OpenAI's
                                            // service that agent frameworks send and that change no sample.
                                            "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"]

    struct ChatRequest: Sendable {
        var messages: OrderedParams
        var tools: OrderedParams?
        var templateKwargs: OrderedParams?
        var modelID = ""
        var adapter: String?
        var n = 1
        var sampling = SamplingParams()
        var logprobs = false
        var topLogprobs = 0
        var stream = false
        var includeUsage = false
    }

    func parseChat(_ body: Data) throws -> ChatRequest {
        guard let obj = (try? FastJSON.parse(body)) as? [String: Any],
              case let .dict(ordered) = try JValue.parseJSON(body) else {
            throw RPCError.invalidParams(path: "body", "expected a JSON object")
        }
        let p = try Params(obj, path: "body")
        try p.only(Self.chatAccepted)
        guard let messages = ordered["messages"] else { throw RPCError.invalidParams(path: "messages", "required: the conversation") }
        var r = ChatRequest(messages: OrderedParams(messages))
        (r.modelID, r.adapter) = try resolveModel(p)
        // tool_choice: "none" hides the tools; a named function is the only tool the template
        // shows. "required" and a named choice are not enforced by constrained decoding.
        var choice = "auto", named: String?
        if let c = obj["tool_choice"] {
            if let s = c as? String {
                guard ["none", "auto", "required"].contains(s) else { throw RPCError.invalidParams(path: "tool_choice", "none, auto, required or {type: function, function: {name}}") }
                choice = s
            } else if let o = c as? [String: Any] {
                guard let f = o["function"] as? [String: Any], let name = f["name"] as? String else {
                    throw RPCError.invalidParams(path: "tool_choice.function.name", "required: the name of the tool to call")
                }
                named = name
            } else { throw RPCError.invalidParams(path: "tool_choice", "a string or an object") }
        }
        if let named {
            guard case let .array(list)? = ordered["tools"] else {
                throw RPCError.invalidParams(path: "tool_choice", "names a tool, but the request has no tools")
            }
            let kept = list.filter {
                if case let .dict(t) = $0, case let .dict(f)? = t["function"], case let .string(n)? = f["name"] { return n == named }
                return false
            }
            guard !kept.isEmpty else { throw RPCError.invalidParams(path: "tool_choice.function.name", "'\(named)' is not among the tools") }
            r.tools = OrderedParams(.array(kept))
        } else if let tools = ordered["tools"], choice != "none" { r.tools = OrderedParams(tools) }
        if let k = ordered["chat_template_kwargs"] { r.templateKwargs = OrderedParams(k) }
        if let rf = try p.object("response_format") {
            guard try rf.string("type") == "text" else {
                throw RPCError.invalidParams(path: "response_format.type", "only \"text\" is supported (no constrained decoding)")
            }
        }
        r.n = try p.int("n", 1, min: 1, max: 128)
        let maxTokens = p.has("max_completion_tokens") ? try p.int("max_completion_tokens", min: 1) : try p.int("max_tokens", 256, min: 1)
        r.sampling.maxTokens = maxTokens
        try Self.readSampling(p, into: &r.sampling)
        r.logprobs = try p.bool("logprobs", false)
        r.topLogprobs = try p.int("top_logprobs", 0, min: 0, max: 20)
        if r.topLogprobs > 0 && !r.logprobs { throw RPCError.invalidParams(path: "top_logprobs", "needs logprobs: true") }
        r.stream = try p.bool("stream", false)
        if let so = try p.object("stream_options") { r.includeUsage = try so.bool("include_usage", false) }
        return r
    }

    func chatCompletions(_ http: HTTPRequest, _ responder: HTTPResponder) {
        let request: ChatRequest
        do { request = try parseChat(http.body) } catch let e as RPCError {
            responder.respond(Self.httpError(e)); return
        } catch { responder.respond(Self.error(400, "\(error)")); return }
        let id = Self.randomID("chatcmpl-")
        let created = Int(Date().timeIntervalSince1970)
        let stream = ChatStream(responder: responder, id: id, created: created, model: request.modelID,
                                buffered: request.tools != nil)
        let prepare: @Sendable (Dispatcher) throws -> Dispatcher.GenerateCall = { d in
            var kwargs: [String: JValue] = [:]
            if let k = request.templateKwargs {
                guard case let .dict(dict) = k.value else { throw RPCError.invalidParams(path: "chat_template_kwargs", "an object") }
                for (key, v) in dict.pairs { kwargs[key] = v }
            }
            let prompt: [Int32]
            do {
                prompt = try d.renderChat(request.messages.value, tools: request.tools?.value, addGenerationPrompt: true,
                                          kwargs: kwargs, path: "messages").1
            } catch let e as RPCError {
                throw RPCError(e.kind, path: e.path.map { $0.hasPrefix("params.") ? String($0.dropFirst(7)) : $0 }, hint: e.hint)
            }
            var options = GenerationOptions()
            options.logprobs = true
            options.topLogprobs = request.topLogprobs
            options.events = request.stream && request.tools == nil
            return Dispatcher.GenerateCall(prompts: [prompt], n: request.n, params: request.sampling, options: options,
                                           adapter: request.adapter)
        }
        let finish: @Sendable (Dispatcher, GenerationResult, Dispatcher.GenerateCall) throws -> Any = { d, out, call in
            Self.chatBody(d, out, call, request, id: id, created: created)
        }
        let completion: Scheduler.Completion = { result in
            switch result {
            case let .success(value):
                if request.stream { stream.end(value as? [String: Any], includeUsage: request.includeUsage) }
                else { responder.respond(HTTPResponse(status: 200, body: JSONRPC.encode(value))) }
            case let .failure(e):
                if stream.started { stream.fail(e) } else { responder.respond(Self.httpError(e)) }
            }
        }
        let onEvent: (@Sendable (Dispatcher, TokenEvent) -> Void)? = request.stream && request.tools == nil ? { @Sendable d, e in
            stream.event(d, e, n: request.n, logprobs: request.logprobs)
        } : nil
        scheduler.submit(generate: Scheduler.GenerateWork(prepare: prepare, finish: finish, onEvent: onEvent),
                         owner: responder.connection, completion: completion)
    }

    static func tokenLogprob(_ d: Dispatcher, _ t: Int32, _ lp: Float) -> [String: Any] {
        let piece = (try? d.tokenizer?.decode([t])) ?? nil ?? "<\(t)>"
        return ["token": piece, "logprob": lp, "bytes": Array(piece.utf8).map(Int.init)]
    }

    static func chatBody(_ d: Dispatcher, _ out: GenerationResult, _ call: Dispatcher.GenerateCall, _ r: ChatRequest,
                         id: String, created: Int) -> [String: Any] {
        var choices: [[String: Any]] = [], completionCount = 0
        for (s, sample) in out.results[0].enumerated() {
            completionCount += sample.tokens.count
            let parsed = ChatAnswer(text: sample.text, toolsOffered: r.tools != nil)
            var message: [String: Any] = ["role": "assistant", "content": parsed.content.map { $0 as Any } ?? NSNull()]
            if let reasoning = parsed.reasoning { message["reasoning_content"] = reasoning }
            if !parsed.toolCalls.isEmpty {
                message["tool_calls"] = parsed.toolCalls.map { c -> [String: Any] in
                    ["id": randomID("call_"), "type": "function",
                     "function": ["name": c.name, "arguments": c.arguments]]
                }
            }
            var choice: [String: Any] = ["index": s, "message": message,
                                         "finish_reason": !parsed.toolCalls.isEmpty ? "tool_calls" : sample.finishReason == .length ? "length" : "stop"]
            if let problem = parsed.parseError { choice["tool_call_parse_error"] = problem }
            if r.logprobs {
                choice["logprobs"] = ["content": sample.tokens.enumerated().map { i, t -> [String: Any] in
                    var entry = tokenLogprob(d, t, sample.logprobs[i])
                    entry["top_logprobs"] = (sample.topLogprobs?[i] ?? []).prefix(r.topLogprobs).map { tokenLogprob(d, $0.token, $0.logprob) }
                    return entry
                }]
            } else {
                choice["logprobs"] = NSNull()
            }
            choices.append(choice)
        }
        d.countGenerated(completionCount)
        let promptCount = call.prompts[0].count
        return ["id": id, "object": "chat.completion", "created": created, "model": r.modelID, "choices": choices,
                "usage": ["prompt_tokens": promptCount, "completion_tokens": completionCount, "total_tokens": promptCount + completionCount],
                "system_fingerprint": "ember-w\(d.trainer.weightsVersion)"]
    }
}

/// A generated answer split as OpenAI's chat API returns it.
public struct ChatAnswer {
    public struct Call: Equatable {
        public let name: String, arguments: String
        public init(name: String, arguments: String) { self.name = name; self.arguments = arguments }
    }
    public var content: String?
    public var reasoning: String?
    public var toolCalls: [Call] = []
    public var parseError: String?

    public init(text: String, toolsOffered: Bool) {
        var rest = text
        // Thinking models: <think>...</think> (or only the closing tag when the template opened it).
        if let close = rest.range(of: "</think>") {
            var thought = String(rest[..<close.lowerBound])
            if let open = thought.range(of: "<think>") { thought = String(thought[open.upperBound...]) }
            reasoning = thought.trimmingCharacters(in: .whitespacesAndNewlines)
            rest = String(rest[close.upperBound...])
        }
        if toolsOffered { rest = parseCalls(rest) }
        let trimmed = rest.trimmingCharacters(in: .whitespacesAndNewlines)
        // Beside tool calls (or after reasoning) the text is trimmed; a plain answer stays as generated.
        if !toolCalls.isEmpty { content = trimmed.isEmpty ? nil : trimmed } else { content = reasoning == nil ? rest : trimmed }
    }

    /// Tool calls out of `text`; returns the text around them.
    mutating func parseCalls(_ text: String) -> String {
        if text.contains("<tool_call>") {
            var outside = "", cursor = text.startIndex
            var calls: [Call] = []
            while let open = text.range(of: "<tool_call>", range: cursor..<text.endIndex) {
                outside += text[cursor..<open.lowerBound]
                guard let close = text.range(of: "</tool_call>", range: open.upperBound..<text.endIndex) else {
                    parseError = "a <tool_call> without </tool_call>"
                    return text
                }
                let body = String(text[open.upperBound..<close.lowerBound])
                guard let call = Self.call(fromJSON: body) else {
                    parseError = "the JSON inside <tool_call> is not {\"name\": ..., \"arguments\": {...}}: \(body.prefix(200))"
                    return text
                }
                calls.append(call)
                cursor = close.upperBound
            }
            outside += text[cursor...]
            toolCalls = calls
            return outside
        }
        // Llama 3: the whole answer is one JSON call (optionally after <|python_tag|>), or several joined by ';'.
        var body = text.trimmingCharacters(in: .whitespacesAndNewlines)
        if body.hasPrefix("<|python_tag|>") { body = String(body.dropFirst("<|python_tag|>".count)) }
        guard body.hasPrefix("{") else { return text }
        let parts = body.split(separator: ";").map { $0.trimmingCharacters(in: .whitespaces) }
        let calls = parts.compactMap { Self.call(fromJSON: $0) }
        if calls.count == parts.count { toolCalls = calls; return "" }
        if body.contains("\"name\"") { parseError = "the answer looks like a JSON tool call but does not parse: \(body.prefix(200))" }
        return text
    }

    static func call(fromJSON text: String) -> Call? {
        guard let data = text.trimmingCharacters(in: .whitespacesAndNewlines).data(using: .utf8),
              case let .dict(d)? = try? JValue.parseJSON(data), case let .string(name)? = d["name"] else { return nil }
        let args = d["arguments"] ?? d["parameters"] ?? .dict(JDict())
        if case let .string(s) = args { return Call(name: name, arguments: s) }
        return Call(name: name, arguments: args.jsonText)
    }
}

/// Server-sent events of one streaming chat completion. With tools offered the answer is sent
/// whole at the end (a tool call is known only once it is complete).
/// Sendable by hand: the compute thread and the completion both touch it; `started` under `lock`.
final class ChatStream: SSEStream, @unchecked Sendable {
    let buffered: Bool
    private var opened = Set<Int>()

    init(responder: HTTPResponder, id: String, created: Int, model: String, buffered: Bool) {
        self.buffered = buffered
        super.init(responder: responder, id: id, created: created, model: model, objectName: "chat.completion.chunk")
    }

    func event(_ d: Dispatcher, _ e: TokenEvent, n: Int, logprobs: Bool) {
        let index = e.sampleIndex
        lock.lock()
        let first = opened.insert(index).inserted
        lock.unlock()
        if first { send(chunk([["index": index, "delta": ["role": "assistant", "content": ""], "logprobs": NSNull(), "finish_reason": NSNull()]])) }
        var choice: [String: Any] = ["index": index, "delta": e.textDelta.isEmpty ? [:] : ["content": e.textDelta],
                                     "finish_reason": e.finish.map { $0 == .length ? "length" : "stop" } ?? NSNull()]
        choice["logprobs"] = logprobs ? ["content": [OpenAIRoutes.tokenLogprob(d, e.token, e.logprob)]] : NSNull()
        send(chunk([choice]))
    }

    func end(_ final: [String: Any]?, includeUsage: Bool) {
        if buffered, let choices = final?["choices"] as? [[String: Any]] {
            for c in choices {
                var delta = (c["message"] as? [String: Any]) ?? [:]
                if var calls = delta["tool_calls"] as? [[String: Any]] {
                    for i in calls.indices { calls[i]["index"] = i }
                    delta["tool_calls"] = calls
                }
                send(chunk([["index": c["index"] ?? 0, "delta": delta, "logprobs": NSNull(), "finish_reason": c["finish_reason"] ?? NSNull()]]))
            }
        }
        if includeUsage, let usage = final?["usage"] { var c = chunk([]); c["usage"] = usage; send(c) }
        done()
    }
}
