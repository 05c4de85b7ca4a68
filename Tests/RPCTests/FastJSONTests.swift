// The request reader against Foundation's JSONSerialization: the same values on valid JSON
// (numbers bit for bit), a refusal wherever the grammar refuses, and unboxed number arrays.
import Foundation
import JSON
import XCTest
import RPC

final class FastJSONTests: XCTestCase {
    /// A canonical form of either reader's output: numbers as their Double bits or Int, arrays
    /// and objects recursively, keys sorted.
    func canon(_ v: Any) -> String {
        if v is NSNull { return "null" }
        if let s = v as? String { return "s:" + s.unicodeScalars.map { String($0.value, radix: 16) }.joined(separator: ",") }
        if type(of: v) == Bool.self { return (v as! Bool) ? "true" : "false" }
        if let n = v as? NSNumber, String(cString: n.objCType) == "c" { return n.boolValue ? "true" : "false" }
        if let n = JSONNumber.classify(v) {
            switch n {
            case let .int(i): return "n:\(Double(i).bitPattern)"
            case let .double(d): return "n:\(d.bitPattern)"
            }
        }
        if let d = v as? [String: Any] { return "{" + d.keys.sorted().map { "\($0)=\(canon(d[$0]!))" }.joined(separator: ";") + "}" }
        if let a = v as? [Any] { return "[" + a.map(canon).joined(separator: ";") + "]" }
        XCTFail("unexpected value \(type(of: v))")
        return "?"
    }

    func testAgreesWithFoundationOnValidJSON() throws {
        let texts = [
            #"{"a": [1, 2, 3], "b": {"c": null, "d": true, "e": false}, "f": "x\"y\\z\/\n\t\u00e9\ud83d\ude00"}"#,
            "[0, -0, 1.5, -2.25e-3, 1E10, 3e+2, 0.5, 123456789012345678, 9223372036854775807, -9223372036854775808]",
            "[1, 2.5, 3]", #"[1, "a", [2, 3.5], {}]"#, "[]", "{}", "\"\"", "42", "-1.0", "null", "  [ 1 , 2 ]  ",
            #"{"tokens": [5, 7, 11], "old_logprobs": [-0.5, -1.25, -3.75]}"#,
            #""caf\u00e9 \u4e2d\u6587 日本""#,
        ]
        for text in texts {
            let data = Data(text.utf8)
            let want = try JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed])
            let got = try FastJSON.parse(data)
            XCTAssertEqual(canon(got), canon(want), text)
        }
    }

    /// Numbers are correctly rounded (strtod), as Swift's Double(String) and Python's float()
    /// read them. Foundation's reader on Linux is not: it reads 0.30000000000000004 one ulp high.
    func testNumbersAreCorrectlyRounded() throws {
        let python: [(String, UInt64)] = [("0.30000000000000004", 4599075939470750516),
                                           ("-0.12345678901234568", 13816932456701818463),
                                           ("-3.0000000000000004", 13837309855095848961),
                                           ("1.7976931348623157e308", 0x7FEF_FFFF_FFFF_FFFF), ("5e-324", 1),
                                           ("2.2250738585072014e-308", 0x0010_0000_0000_0000)]
        for (text, bits) in python {
            XCTAssertEqual((try FastJSON.parse(Data(text.utf8)) as! Double).bitPattern, bits, text)
        }
        var rng = SystemRandomNumberGenerator()
        var parts: [String] = []
        for k in 0..<3000 {
            let d = Double(bitPattern: rng.next() & 0x7FEF_FFFF_FFFF_FFFF) * (k % 2 == 0 ? 1 : -1)
            parts.append(k % 3 == 0 ? "\(Int.random(in: -1_000_000...1_000_000))" : "\(d)")
            parts.append(String(format: "%.17g", Double.random(in: -20...0)))
            parts.append(String(format: "%.9g", Double.random(in: -1...1)))
        }
        let got = try FastJSON.parse(Data(("[" + parts.joined(separator: ",") + "]").utf8)) as! [Double]
        XCTAssertEqual(got.count, parts.count)
        for (g, text) in zip(got, parts) { XCTAssertEqual(g.bitPattern, Double(text)!.bitPattern, text) }
    }

    func testRefusesWhatTheGrammarRefuses() {
        let bad = ["", "[1,]", "{\"a\":1,}", "[01]", "[1.]", "[.5]", "[1e]", "[+1]", "[NaN]", "[Infinity]", "{a:1}",
                   "{'a':1}", "[1 2]", "\"\\x\"", "\"\\ud800\"", "\"\\udc00x\"", "\"a\nb\"", "[true false]", "tru",
                   "\"abc", "[1]]", "{\"a\" 1}", "// c\n1", "\"\\u12\"", "[-]", "[--1]", "[1e400]", "-1e309"]
        for text in bad {
            XCTAssertThrowsError(try FastJSON.parse(Data(text.utf8)), "accepted \(text.debugDescription)")
        }
        XCTAssertThrowsError(try FastJSON.parse(Data([0x22, 0xFF, 0xFE, 0x22])), "invalid UTF-8")
        let deep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        XCTAssertThrowsError(try FastJSON.parse(Data(deep.utf8))) { e in
            XCTAssertEqual((e as? FastJSON.Failure)?.message, "nesting deeper than 64 levels")
        }
        let ok = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        XCTAssertNoThrow(try FastJSON.parse(Data(ok.utf8)))
    }

    func testNumberArraysStayUnboxedAndParamsReadThem() throws {
        let v = try FastJSON.parse(Data(#"{"tokens": [1, 2, 3], "lp": [-0.5, -1, 2e-3], "mixed": [1, "x"], "big": [1, 9999999999999999999]}"#.utf8))
        let o = v as! [String: Any]
        XCTAssertTrue(type(of: o["tokens"]!) == [Int].self)
        XCTAssertTrue(type(of: o["lp"]!) == [Double].self)
        XCTAssertTrue(type(of: o["mixed"]!) == [Any].self)
        XCTAssertTrue(type(of: o["big"]!) == [Double].self, "an integer beyond Int64 is a Double")
        let mixed = try FastJSON.parse(Data("[1, 2.5, null, 3]".utf8)) as! [Any]
        XCTAssertTrue(type(of: mixed[0]) == Int.self && type(of: mixed[1]) == Double.self && type(of: mixed[3]) == Int.self,
                      "a mixed array keeps each number as written")
        let ordered = try FastJSON.parse(Data(#"{"z": 1, "a": [1, 2], "m": {"y": 2, "b": 3}}"#.utf8), orderedObjects: true)
        let pairs = (ordered as! FastJSON.OrderedObject).pairs
        XCTAssertEqual(pairs.map(\.key), ["z", "a", "m"])
        XCTAssertEqual(((pairs[2].value as! FastJSON.OrderedObject).pairs).map(\.key), ["y", "b"])
        let p = try Params(v)
        XCTAssertEqual(try p.tokens("tokens"), [1, 2, 3])
        XCTAssertEqual(try p.floats("lp"), [-0.5, -1, 0.002])
        XCTAssertThrowsError(try p.tokens("lp")) { e in XCTAssertEqual((e as? RPCError)?.path, "params.lp[0]") }
        let neg = try Params(FastJSON.parse(Data(#"{"t": [3, -1]}"#.utf8)))
        XCTAssertThrowsError(try neg.tokens("t")) { e in XCTAssertEqual((e as? RPCError)?.path, "params.t[1]") }
        let flags = try Params(FastJSON.parse(Data(#"{"b": true, "n": 1, "f": 2.0, "x": 2.5}"#.utf8)))
        XCTAssertEqual(try flags.bool("b", false), true)
        XCTAssertThrowsError(try flags.bool("n", false), "1 is not a boolean")
        XCTAssertThrowsError(try flags.int("b"), "true is not an integer")
        XCTAssertEqual(try flags.int("f"), 2)
        XCTAssertThrowsError(try flags.int("x"))
    }
}
