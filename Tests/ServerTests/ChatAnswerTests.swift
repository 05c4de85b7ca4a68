// Splitting a generated chat answer as OpenAI's API returns it: reasoning, content, tool calls
// in Hermes (<tool_call>) and Llama 3 (bare JSON) styles, and malformed calls reported as
// content with the parse failure.
import Server
import XCTest

final class ChatAnswerTests: XCTestCase {
    func testHermesToolCallsAndTheTextAroundThem() {
        let a = ChatAnswer(text: "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"n\": 2}}\n</tool_call>\n"
                                + "<tool_call>{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>", toolsOffered: true)
        XCTAssertEqual(a.toolCalls, [.init(name: "get_weather", arguments: #"{"city": "Paris", "n": 2}"#), .init(name: "add", arguments: #"{"a": 1}"#)])
        XCTAssertEqual(a.content, "Let me check.")
        XCTAssertNil(a.parseError)
    }

    func testLlama3JSONCalls() {
        let a = ChatAnswer(text: #"<|python_tag|>{"name": "calc", "parameters": {"expression": "2+2"}}"#, toolsOffered: true)
        XCTAssertEqual(a.toolCalls, [.init(name: "calc", arguments: #"{"expression": "2+2"}"#)])
        XCTAssertNil(a.content)
        let two = ChatAnswer(text: #"{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}"#, toolsOffered: true)
        XCTAssertEqual(two.toolCalls.map(\.name), ["a", "b"])
    }

    func testMalformedCallsStayContentWithTheFailureReported() {
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": {oops}</tool_call>"
        let a = ChatAnswer(text: text, toolsOffered: true)
        XCTAssertTrue(a.toolCalls.isEmpty)
        XCTAssertEqual(a.content, text)
        XCTAssertTrue(a.parseError?.contains("not {\"name\"") ?? false, a.parseError ?? "")
        let open = ChatAnswer(text: "<tool_call>{\"name\": \"f\"", toolsOffered: true)
        XCTAssertEqual(open.parseError, "a <tool_call> without </tool_call>")
        let json = ChatAnswer(text: "{\"name\": \"f\", \"parameters\": {", toolsOffered: true)
        XCTAssertNotNil(json.parseError)
        XCTAssertEqual(json.content, "{\"name\": \"f\", \"parameters\": {")
    }

    func testReasoningIsSplitOutAndToolsAreParsedOnlyWhenOffered() {
        let a = ChatAnswer(text: "<think>\n2+2 is 4.\n</think>\n\nFour.", toolsOffered: false)
        XCTAssertEqual(a.reasoning, "2+2 is 4.")
        XCTAssertEqual(a.content, "Four.")
        // The template opened the block: only the closing tag is generated.
        let b = ChatAnswer(text: "thinking...</think>Answer", toolsOffered: false)
        XCTAssertEqual(b.reasoning, "thinking...")
        XCTAssertEqual(b.content, "Answer")
        let c = ChatAnswer(text: "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>", toolsOffered: false)
        XCTAssertTrue(c.toolCalls.isEmpty)
        XCTAssertNil(c.reasoning)
        XCTAssertEqual(c.content, "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>")
    }
}
