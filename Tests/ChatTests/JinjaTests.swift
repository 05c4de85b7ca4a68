// The interpreter's own rules, beyond the fixtures: errors name their line, Python semantics,
// whitespace control, limits.
import Chat
import TestSupport
import Foundation
import XCTest

final class JinjaTests: XCTestCase {
    func render(_ source: String, _ context: [String: JValue] = [:]) throws -> String {
        try JinjaTemplate(source).render(context)
    }

    func testIteratingNoneFailsAsPythonDoes() throws {
        XCTAssertThrowsError(try render("{% for t in tools %}x{% endfor %}", ["tools": .none])) { e in
            XCTAssertEqual((e as? TemplateError)?.message, "'NoneType' object is not iterable")
        }
        XCTAssertEqual(try render("{% for t in tools %}x{% endfor %}"), "", "an undefined name iterates as empty")
    }
}

/// Small templates rendered by transformers' own Jinja environment (scripts/make_chat_fixtures.py):
/// the same output, or an error where Jinja raises one.
final class JinjaSnippetTests: XCTestCase {
    func testSnippetsRenderAsJinjaDoes() throws {
        let cases = try JValue.parseJSON(Data(contentsOf: URL(fileURLWithPath: fixturesDirectory + "/chat/cases.json")))
        guard case let .dict(root) = cases, case let .array(snippets)? = root["snippets"] else { return XCTFail("cases.json layout") }
        var checked = 0
        for case let .dict(s) in snippets {
            let source = s["source"]!.str
            var context: [String: JValue] = [:]
            if case let .dict(c)? = s["context"] { for (k, v) in c.pairs { context[k] = v } }
            do {
                let out = try JinjaTemplate(source).render(context)
                guard case let .string(expected)? = s["output"] else {
                    XCTFail("\(source): rendered \(out.debugDescription) but Jinja raised \(s["error"]!.str)"); continue
                }
                XCTAssertEqual(out, expected, source)
            } catch let e as TemplateError {
                guard case let .string(error)? = s["error"] else { XCTFail("\(source): \(e)"); continue }
                if e.raised { XCTAssertEqual("TemplateError: " + e.message, error, source) }
                XCTAssertGreaterThan(e.line, 0, "\(source): the error names its line")
            }
            checked += 1
        }
        XCTAssertEqual(checked, snippets.count)
    }
}

final class JinjaLimitTests: XCTestCase {
    func expectError(_ source: String, line: Int, _ fragment: String, file: StaticString = #filePath, l: UInt = #line) {
        XCTAssertThrowsError(try JinjaTemplate(source).render(["x": .dict(JDict())]), file: file, line: l) { e in
            guard let t = e as? TemplateError else { return XCTFail("\(e)", file: file, line: l) }
            XCTAssertEqual(t.line, line, "\(t)", file: file, line: l)
            XCTAssertTrue(t.message.contains(fragment), "\(t)", file: file, line: l)
        }
    }

    func testErrorsNameTheirLine() {
        expectError("a\nb\n{% frobnicate %}", line: 3, "unknown statement 'frobnicate'")
        expectError("a\n{{ x | nosuch }}", line: 2, "unknown filter 'nosuch'")
        expectError("{% if true %}\n\n{{ x.y.z }}{% endif %}\n", line: 3, "undefined")
        expectError("{% for a in b %}", line: 1, "missing 'else' or 'endfor'")
        expectError("line\n{{ 'unterminated }}", line: 2, "unclosed tag")
        expectError("{{ a b }}", line: 1, "unexpected 'b'")
        expectError("{% for x in [1] recursive %}{% endfor %}", line: 1, "not supported")
    }

    func testRunawayTemplatesHitALimit() {
        expectError("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", line: 1, "recursed deeper")
        expectError("{% set ns = namespace(s='xx') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", line: 1,
                    "grew beyond")
        var nested = try! JinjaTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
        nested.maxSteps = 200_000   // the default (5 million) takes a few seconds to reach
        XCTAssertThrowsError(try nested.render([:])) { e in XCTAssertTrue("\(e)".contains("steps"), "\(e)") }
        expectError("{% for i in range(1000) %}{{ 'y' * 10000 }}{% endfor %}", line: 1, "output grew beyond")
        expectError("{{ range(10000000) | length }}", line: 1, "range is too long")
    }

    func testRaiseExceptionIsMarkedAsTheTemplatesOwn() {
        XCTAssertThrowsError(try JinjaTemplate("\n{{ raise_exception('Only user and assistant roles') }}").render([:])) { e in
            let t = e as? TemplateError
            XCTAssertEqual(t?.raised, true)
            XCTAssertEqual(t?.line, 2)
            XCTAssertEqual(t?.message, "Only user and assistant roles")
        }
    }
}
