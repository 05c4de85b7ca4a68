// chat.render and generate with messages through the JSON-RPC decoder: the conversation's key
// order survives decoding (so tool schemas print as transformers prints them), the text and ids
// equal apply_chat_template's, generate on messages samples exactly what it samples on the
// rendered ids, and bad conversations are refused with their path.
import Chat
import Engine
import Foundation
import Kernels
import Models
import RPC
import TestSupport
import Tokenizer
import XCTest

final class ChatRPCTests: XCTestCase {
    var dispatcher: Dispatcher!
    var dir = ""

    override func setUpWithError() throws {
        Compute.setThreads(2)
        // A model folder: the fixture Qwen2 tokenizer, Qwen2.5's shipped template, a small qwen2
        // model whose vocabulary covers the tokenizer's.
        dir = NSTemporaryDirectory() + "chat-rpc-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            try FileManager.default.copyItem(atPath: fixturesDirectory + "/tokenizers/qwen2/" + f, toPath: dir + "/" + f)
        }
        try FileManager.default.copyItem(atPath: fixturesDirectory + "/chat/templates/qwen2.5.jinja", toPath: dir + "/chat_template.jinja")
        var c = Dispatcher.Configuration()
        c.slots = 4
        c.capacity = 512
        c.modelDirectory = dir
        dispatcher = Dispatcher(model: try Self.smallModel(), tokenizer: try Tokenizer(directory: dir), configuration: c)
    }

    static func smallModel() throws -> TransformerModel {
        let config: [String: Any] = ["model_type": "qwen2", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "num_key_value_heads": 1, "intermediate_size": 32, "vocab_size": 8192,
                                     "tie_word_embeddings": true, "max_position_embeddings": 512]
        let model = try TransformerModel(config: try JSONSerialization.data(withJSONObject: config))
        var rng = SeededRandom(seed: 5)
        for i in 0..<model.parameters.count { model.parameters.values[i] = rng.normal() * 0.5 }
        model.parameters.markModified()
        return model
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// A call made from JSON text (so the decoder's ordered reading is what runs).
    func call(_ json: String) throws -> [String: Any] {
        guard case let .single(.success(request), _) = JSONRPC.decode(Data(json.utf8)) else { throw RPCError.invalidRequest("decode") }
        let result = try dispatcher.call(request.method, request.params)
        let encoded = JSONRPC.encode(JSONRPC.response(id: .number("1"), result: result))
        return (try JSONSerialization.jsonObject(with: encoded) as! [String: Any])["result"] as! [String: Any]
    }

    func fixtureCase(_ conversation: String) throws -> (params: String, text: String, ids: [Int]) {
        let data = try Data(contentsOf: URL(fileURLWithPath: fixturesDirectory + "/chat/cases.json"))
        guard case let .dict(root) = try JValue.parseJSON(data), case let .dict(convs)? = root["conversations"],
              case let .dict(conv)? = convs[conversation], case let .dict(templates)? = root["templates"],
              case let .dict(t)? = templates["qwen2.5"], case let .dict(cases)? = t["cases"], case let .dict(want)? = cases[conversation],
              case let .string(text)? = want["text"], case let .array(ids)? = want["ids"] else { throw RPCError.invalidRequest("fixture") }
        var params: [String] = []
        // Re-serialise in the fixture's key order (the order the Python side rendered with).
        params.append("\"messages\": " + (try jsonText(conv["messages"]!)))
        if let tools = conv["tools"] { params.append("\"tools\": " + (try jsonText(tools))) }
        params.append("\"add_generation_prompt\": \(conv["add_generation_prompt"]!.truthy)")
        return ("{" + params.joined(separator: ", ") + "}", text, ids.map { if case let .int(i) = $0 { return i }; return -1 })
    }

    func jsonText(_ v: JValue) throws -> String {
        // The fixture's own JSON text of this value, key order kept (tojson with compact separators).
        try JinjaTemplate("{{ v | tojson }}").render(["v": v])
    }

    func testChatRenderEqualsApplyChatTemplateWithToolsInTheirKeyOrder() throws {
        for conversation in ["system_user", "multi_turn", "tools", "tool_call_and_result", "unicode"] {
            let (params, text, ids) = try fixtureCase(conversation)
            let r = try call(#"{"jsonrpc": "2.0", "id": 1, "method": "chat.render", "params": "# + params + "}")
            XCTAssertEqual(r["text"] as? String, text, conversation)
            XCTAssertEqual(r["tokens"] as? [Int], ids, conversation)
        }
        // In a batch too.
        let (params, text, _) = try fixtureCase("tools")
        guard case let .batch(items) = JSONRPC.decode(Data(("[{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"server.info\"}, "
                                                              + "{\"jsonrpc\": \"2.0\", \"id\": 2, \"method\": \"chat.render\", \"params\": \(params)}]").utf8)),
              case let .success(second) = items[1].0 else { return XCTFail("batch") }
        XCTAssertEqual((try dispatcher.call(second.method, second.params) as! [String: Any])["text"] as? String, text)
    }

    func testGenerateOnMessagesSamplesWhatItSamplesOnTheRenderedIds() throws {
        let messages = #"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]"#
        let rendered = try call(#"{"jsonrpc": "2.0", "id": 1, "method": "chat.render", "params": {"messages": "# + messages + "}}")
        let ids = rendered["tokens"] as! [Int]
        XCTAssertTrue((rendered["text"] as! String).hasSuffix("<|im_start|>assistant\n"))
        let viaMessages = try call(#"{"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {"messages": "# + messages
                                    + #", "max_tokens": 6, "seed": 3, "ignore_eos": true}}"#)
        let viaIds = try call(#"{"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {"prompt_tokens": ["# + "\(ids)"
                                + #"], "max_tokens": 6, "seed": 3, "ignore_eos": true}}"#)
        let a = (viaMessages["results"] as! [[String: Any]])[0], b = (viaIds["results"] as! [[String: Any]])[0]
        XCTAssertEqual(a["prompt_tokens"] as? [Int], ids)
        XCTAssertEqual(((a["samples"] as! [[String: Any]])[0])["tokens"] as? [Int], ((b["samples"] as! [[String: Any]])[0])["tokens"] as? [Int])
        // A list of conversations gives one prompt each.
        let two = try call(#"{"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {"messages": ["# + messages + ", " + messages
                            + #"], "max_tokens": 2}}"#)
        XCTAssertEqual((two["results"] as! [Any]).count, 2)
    }

    func testBadConversationsAreRefusedWithTheirPath() throws {
        func refused(_ params: [String: Any], _ path: String, _ fragment: String, line: UInt = #line) {
            XCTAssertThrowsError(try dispatcher.call("chat.render", params), line: line) { e in
                guard let r = e as? RPCError else { return XCTFail("\(e)", line: line) }
                XCTAssertEqual(r.kind, .invalidParams, "\(r)", line: line)
                XCTAssertEqual(r.path, path, "\(r)", line: line)
                XCTAssertTrue(r.hint?.contains(fragment) ?? false, "\(r)", line: line)
            }
        }
        refused(["messages": [["role": "wizard", "content": "x"]]], "params.messages[0].role", "unknown role")
        refused(["messages": [["role": "user"]]], "params.messages[0].content", "missing")
        refused(["messages": [["content": "x"]]], "params.messages[0].role", "missing")
        refused(["messages": []], "params.messages", "non-empty")
        refused(["messages": [["role": "user", "content": "q"], ["role": "tool", "content": "42"]]], "params.messages[1]",
                "without a tool call")
        refused(["messages": [["role": "user", "content": "q"],
                              ["role": "assistant", "tool_calls": [["id": "a1", "type": "function", "function": ["name": "f", "arguments": [:]]]]],
                              ["role": "tool", "tool_call_id": "zz", "content": "42"]]], "params.messages[2].tool_call_id", "answers no")
        refused(["messages": [["role": "user", "content": 5]]], "params.messages[0].content", "a string")
        XCTAssertThrowsError(try dispatcher.call("generate", ["messages": [["role": "user", "content": "x"]], "prompts": ["y"]])) { e in
            XCTAssertEqual((e as? RPCError)?.path, "params.messages")
        }
    }

    func testATemplatesRaiseExceptionComesBackAsInvalidParams() throws {
        // Gemma 2's template refuses a system message.
        try FileManager.default.removeItem(atPath: dir + "/chat_template.jinja")
        try FileManager.default.copyItem(atPath: fixturesDirectory + "/chat/templates/gemma2.jinja", toPath: dir + "/chat_template.jinja")
        var c = Dispatcher.Configuration()
        c.modelDirectory = dir
        let d = Dispatcher(model: try Self.smallModel(), tokenizer: try Tokenizer(directory: dir), configuration: c)
        XCTAssertThrowsError(try d.call("chat.render", ["messages": [["role": "system", "content": "s"], ["role": "user", "content": "u"]]])) { e in
            let r = e as? RPCError
            XCTAssertEqual(r?.kind, .invalidParams)
            XCTAssertEqual(r?.path, "params.messages")
            XCTAssertEqual(r?.hint, "the chat template refused the conversation: System role not supported")
        }
        // Without a template, chat.render says so.
        try FileManager.default.removeItem(atPath: dir + "/chat_template.jinja")
        let none = Dispatcher(model: try Self.smallModel(), tokenizer: try Tokenizer(directory: dir), configuration: c)
        XCTAssertThrowsError(try none.call("chat.render", ["messages": [["role": "user", "content": "u"]]])) { e in
            XCTAssertTrue((e as? RPCError)?.hint?.contains("no chat template") ?? false, "\(e)")
        }
    }
}
