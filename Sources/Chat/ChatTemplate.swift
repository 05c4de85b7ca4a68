// A model's chat template as Hugging Face ships it (`chat_template.jinja`, or `chat_template` in
// tokenizer_config.json: a string, or a list of named templates), rendered with the variables
// transformers' apply_chat_template passes: the special tokens, messages, tools (None when
// absent), documents, add_generation_prompt, then the caller's extra keyword arguments.
import Foundation

public struct ChatTemplate {
    public let source: String
    let template: JinjaTemplate
    /// Special tokens the template sees (bos_token, eos_token, ...), from tokenizer_config.json.
    public var specialTokens: [String: String]
    /// A second template used when tools are given (a named "tool_use" template), if any.
    let toolTemplate: JinjaTemplate?

    public init(source: String, specialTokens: [String: String] = [:], toolUseSource: String? = nil) throws {
        self.source = source
        template = try JinjaTemplate(source)
        self.specialTokens = specialTokens
        toolTemplate = try toolUseSource.map { try JinjaTemplate($0) }
    }

    /// The template of a model folder, or nil when it has none.
    public static func load(directory: String) throws -> ChatTemplate? {
        let configPath = directory + "/tokenizer_config.json"
        var special: [String: String] = [:]
        var fromConfig: Any?
        if let data = FileManager.default.contents(atPath: configPath),
           let config = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] {
            for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
                if let s = config[key] as? String { special[key] = s }
                else if let d = config[key] as? [String: Any], let s = d["content"] as? String { special[key] = s }
            }
            fromConfig = config["chat_template"]
        }
        do {
            if let text = try? String(contentsOfFile: directory + "/chat_template.jinja", encoding: .utf8) {
                return try ChatTemplate(source: text, specialTokens: special)
            }
            if let text = fromConfig as? String { return try ChatTemplate(source: text, specialTokens: special) }
            if let list = fromConfig as? [[String: Any]] {
                let named = Dictionary(list.compactMap { d -> (String, String)? in
                    guard let n = d["name"] as? String, let t = d["template"] as? String else { return nil }
                    return (n, t)
                }, uniquingKeysWith: { a, _ in a })
                guard let main = named["default"] ?? named.values.first else { return nil }
                return try ChatTemplate(source: main, specialTokens: special, toolUseSource: named["tool_use"])
            }
        } catch let e as TemplateError {
            throw TemplateError(line: e.line, message: "\(directory): chat template: \(e.message)")
        }
        return nil
    }

    /// The rendered text (what transformers' apply_chat_template(tokenize=False) returns).
    public func render(messages: JValue, tools: JValue? = nil, addGenerationPrompt: Bool = true,
                       kwargs: [String: JValue] = [:], now: Date? = nil) throws -> String {
        var context: [String: JValue] = [:]
        for (k, v) in specialTokens { context[k] = .string(v) }
        context["messages"] = messages
        context["tools"] = tools ?? JValue.none
        context["documents"] = JValue.none
        context["add_generation_prompt"] = .bool(addGenerationPrompt)
        for (k, v) in kwargs { context[k] = v }
        let chosen = tools != nil && tools?.isUndefined == false ? (toolTemplate ?? template) : template
        return try chosen.render(context, now: now)
    }
}
