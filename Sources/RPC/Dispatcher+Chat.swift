// chat.render and `generate` with `messages`: conversations checked (roles, content, tool results
// that answer a call), rendered with the model's chat template as transformers would, and
// tokenized without adding special tokens (the template writes them).
import Chat
import Engine
import Foundation
import JSON
import Tokenizer

extension Dispatcher {
    /// Roles a conversation may use.
    static let chatRoles: Set<String> = ["system", "developer", "user", "assistant", "tool"]

    func chatTemplate() throws -> ChatTemplate {
        switch chatTemplateState {
        case let .loaded(t): return t
        case let .failed(reason):
            throw RPCError(.invalidRequest, path: "method", hint: "the model's chat template cannot be used: \(reason)")
        case .absent:
            throw RPCError(.invalidRequest, path: "method",
                           hint: "the model has no chat template (chat_template.jinja or tokenizer_config.json's chat_template); send prompts instead")
        }
    }

    /// A parameter as a template value, with its key order when the request kept it.
    static func templateValue(_ raw: Any?) -> JValue? {
        guard let raw, !isJSONNull(raw) else { return nil }
        if let o = raw as? OrderedParams { return o.value }
        return JValue.fromJSON(raw)
    }

    /// Checks one conversation; `path` names it in errors.
    static func checkConversation(_ messages: JValue, path: String) throws {
        guard case let .array(list) = messages, !list.isEmpty else {
            throw RPCError.invalidParams(path: path, "a conversation is a non-empty list of messages")
        }
        var openCalls: [String] = [], anyCall = false
        for (i, m) in list.enumerated() {
            let at = "\(path)[\(i)]"
            guard case let .dict(d) = m else { throw RPCError.invalidParams(path: at, "a message is an object with role and content") }
            guard case let .string(role)? = d["role"] else { throw RPCError.invalidParams(path: at + ".role", "missing (a string)") }
            guard chatRoles.contains(role) else {
                throw RPCError.invalidParams(path: at + ".role", "unknown role '\(role)'; use one of \(chatRoles.sorted().joined(separator: ", "))")
            }
            var hasCalls = false
            if case let .array(calls)? = d["tool_calls"] {
                guard role == "assistant" else { throw RPCError.invalidParams(path: at + ".tool_calls", "only assistant messages make tool calls") }
                for (k, c) in calls.enumerated() {
                    guard case let .dict(call) = c, case let .dict(f)? = call["function"], case .string? = f["name"] else {
                        throw RPCError.invalidParams(path: "\(at).tool_calls[\(k)]", "a tool call is {type: \"function\", function: {name, arguments}}")
                    }
                    if case let .string(id)? = call["id"] { openCalls.append(id) }
                    hasCalls = true
                }
                anyCall = anyCall || hasCalls
            }
            switch d["content"] {
            case .string?: break
            case let .array(parts)?:
                for (k, part) in parts.enumerated() {
                    guard case let .dict(p) = part, case .string? = p["type"] else {
                        throw RPCError.invalidParams(path: "\(at).content[\(k)]", "a content part is an object with a type")
                    }
                }
            case .none?, nil:
                if !(role == "assistant" && hasCalls) {
                    throw RPCError.invalidParams(path: at + ".content", "missing (only an assistant message with tool_calls may omit it)")
                }
            default: throw RPCError.invalidParams(path: at + ".content", "a string or a list of content parts")
            }
            if role == "tool" {
                guard anyCall else {
                    throw RPCError.invalidParams(path: at, "a tool result without a tool call before it (an assistant message with tool_calls)")
                }
                if case let .string(id)? = d["tool_call_id"], !openCalls.isEmpty, !openCalls.contains(id) {
                    throw RPCError.invalidParams(path: at + ".tool_call_id", "'\(id)' answers no earlier tool call (calls: \(openCalls.joined(separator: ", ")))")
                }
            }
        }
    }

    /// Renders one conversation: the text and its token ids.
    public func renderChat(_ messages: JValue, tools: JValue?, addGenerationPrompt: Bool, kwargs: [String: JValue],
                    path: String) throws -> (String, [Int32]) {
        try Self.checkConversation(messages, path: path)
        if let tools {
            guard case let .array(list) = tools else { throw RPCError.invalidParams(path: "params.tools", "a list of tool schemas") }
            for (i, t) in list.enumerated() {
                guard case .dict = t else { throw RPCError.invalidParams(path: "params.tools[\(i)]", "a tool schema is an object") }
            }
        }
        let template = try chatTemplate()
        let text: String
        do {
            text = try template.render(messages: messages, tools: tools, addGenerationPrompt: addGenerationPrompt, kwargs: kwargs)
        } catch let e as TemplateError {
            if e.raised { throw RPCError.invalidParams(path: path, "the chat template refused the conversation: \(e.message)") }
            throw RPCError.internalError("the chat template failed at \(e): report it with the template")
        }
        let tokens = try needTokenizer().encode(text, addSpecialTokens: false)
        return (text, tokens)
    }

    func templateKwargs(_ p: Params) throws -> [String: JValue] {
        guard p.has("template_kwargs") else { return [:] }
        guard case let .dict(d)? = Self.templateValue(p.object["template_kwargs"]) else {
            throw RPCError.invalidParams(path: "params.template_kwargs", "an object of extra template variables (e.g. enable_thinking)")
        }
        return Dictionary(uniqueKeysWithValues: d.pairs)
    }

    func chatRender(_ p: Params) throws -> Any {
        try p.only(["messages", "tools", "add_generation_prompt", "template_kwargs"])
        guard let messages = Self.templateValue(p.object["messages"]) else {
            throw RPCError.invalidParams(path: "params.messages", "give the conversation: a list of {role, content}")
        }
        let (text, tokens) = try renderChat(messages, tools: Self.templateValue(p.object["tools"]),
                                            addGenerationPrompt: try p.bool("add_generation_prompt", true),
                                            kwargs: try templateKwargs(p), path: "params.messages")
        return ["text": text, "tokens": tokens.map(Int.init)]
    }

    /// `generate`'s `messages`: one conversation, or a list of them; each becomes a prompt.
    func chatPrompts(_ p: Params) throws -> [[Int32]] {
        guard let messages = Self.templateValue(p.object["messages"]) else { return [] }
        var conversations: [JValue] = [messages]
        if case let .array(items) = messages, case .array? = items.first { conversations = items }
        let tools = Self.templateValue(p.object["tools"]), kwargs = try templateKwargs(p)
        return try conversations.enumerated().map { i, c in
            try renderChat(c, tools: tools, addGenerationPrompt: true, kwargs: kwargs,
                           path: conversations.count == 1 && !(messages.isNestedList) ? "params.messages" : "params.messages[\(i)]").1
        }
    }
}

extension JValue {
    var isNestedList: Bool { if case let .array(a) = self, case .array? = a.first { return true }; return false }
}
