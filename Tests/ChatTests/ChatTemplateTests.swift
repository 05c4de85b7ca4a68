// Chat templates as models ship them against transformers' apply_chat_template
// (scripts/make_chat_fixtures.py): for every template and conversation the rendered text and the
// token ids are equal, and a template that raises in Python raises here.
import Chat
import Foundation
import TestSupport
import Tokenizer
import XCTest

final class ChatTemplateTests: XCTestCase {
    func testEveryTemplateRendersAsTransformersDoes() throws {
        let dir = fixturesDirectory + "/chat"
        let cases = try JValue.parseJSON(Data(contentsOf: URL(fileURLWithPath: dir + "/cases.json")))
        guard case let .dict(root) = cases, case let .dict(conversations)? = root["conversations"],
              case let .dict(templates)? = root["templates"] else { return XCTFail("cases.json layout") }
        let tokenizer = try Tokenizer(directory: fixturesDirectory + "/tokenizers/qwen2")
        let now = ISO8601DateFormatter().date(from: "2026-01-15T10:30:00Z")!
        var rendered = 0, raised = 0
        for (name, entry) in templates.pairs {
            guard case let .dict(t) = entry, case let .dict(special)? = t["special_tokens"], case let .dict(expected)? = t["cases"] else { continue }
            let source = try String(contentsOfFile: dir + "/templates/\(name).jinja", encoding: .utf8)
            let template = try ChatTemplate(source: source, specialTokens: Dictionary(uniqueKeysWithValues: special.pairs.map { ($0.0, $0.1.str) }))
            for (convName, want) in expected.pairs {
                guard case let .dict(conv)? = conversations[convName], case let .dict(w) = want else { continue }
                var kwargs: [String: JValue] = [:]
                if case let .dict(k)? = conv["kwargs"] { for (key, v) in k.pairs { kwargs[key] = v } }
                let tools: JValue? = conv["tools"]
                let label = "\(name) / \(convName)"
                do {
                    let text = try template.render(messages: conv["messages"]!, tools: tools,
                                                   addGenerationPrompt: conv["add_generation_prompt"]!.truthy, kwargs: kwargs,
                                                   now: now)
                    guard case let .string(expectedText)? = w["text"] else {
                        XCTFail("\(label): rendered, but transformers raised \(w["error"]?.str ?? "")"); continue
                    }
                    XCTAssertEqual(text, expectedText, label)
                    guard case let .array(ids)? = w["ids"] else { continue }
                    XCTAssertEqual(try tokenizer.encode(text, addSpecialTokens: false).map(Int.init),
                                   ids.map { if case let .int(i) = $0 { return i }; return -1 }, label + " ids")
                    rendered += 1
                } catch let e as TemplateError {
                    guard case let .string(message)? = w["error"] else { XCTFail("\(label): \(e)"); continue }
                    if e.raised { XCTAssertEqual(e.message, message, label) }
                    raised += 1
                }
            }
        }
        print("chat templates: \(rendered) renderings equal transformers', \(raised) raise as in transformers")
        XCTAssertGreaterThan(rendered, 100)
    }
}
