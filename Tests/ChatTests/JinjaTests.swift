// The interpreter's own rules, beyond the fixtures: errors name their line, Python semantics,
// whitespace control, limits.
import Chat
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
