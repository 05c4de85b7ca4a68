// tokenizer.json components one at a time: unsupported ones are refused by name, and the
// added-token options behave as in the Rust library.
import Foundation
import TestSupport
import Tokenizer
import XCTest

final class ComponentTests: XCTestCase {
    /// A tiny byte-level BPE tokenizer.json with the given overrides.
    func make(_ overrides: [String: Any], added: [[String: Any]] = []) throws -> Tokenizer {
        var vocab: [String: Int] = [:]
        for (i, s) in ByteLevel.byteToScalar.enumerated() { vocab[String(s)] = i }
        vocab["ab"] = 256; vocab["Ġa"] = 257
        var json: [String: Any] = [
            "version": "1.0", "added_tokens": added, "normalizer": NSNull(),
            "pre_tokenizer": ["type": "ByteLevel", "add_prefix_space": false, "use_regex": true],
            "post_processor": NSNull(), "decoder": ["type": "ByteLevel"],
            "model": ["type": "BPE", "vocab": vocab, "merges": ["a b", ["Ġ", "a"]]] as [String: Any],
        ]
        for (k, v) in overrides { json[k] = v }
        return try Tokenizer(tokenizerJSON: try JSONSerialization.data(withJSONObject: json))
    }

    func expectUnsupported(_ overrides: [String: Any], naming fragment: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try make(overrides), file: file, line: line) { e in
            guard case .unsupported = e as? TokenizerError else { return XCTFail("\(e)", file: file, line: line) }
            XCTAssertTrue("\(e)".contains(fragment), "'\(e)' should name \(fragment)", file: file, line: line)
        }
    }

    func testUnsupportedComponentsAreNamed() {
        expectUnsupported(["model": ["type": "Unigram", "vocab": []]], naming: "Unigram")
        expectUnsupported(["model": ["type": "WordPiece", "vocab": [:]]], naming: "WordPiece")
        expectUnsupported(["pre_tokenizer": ["type": "Metaspace"]], naming: "pre_tokenizer.Metaspace")
        expectUnsupported(["pre_tokenizer": ["type": "Split", "pattern": ["Regex": "\\w+"], "behavior": "Isolated"]], naming: "\\w+")
        expectUnsupported(["pre_tokenizer": ["type": "Split", "pattern": ["Regex": SplitPatternSources.qwen2], "behavior": "Removed"]],
                          naming: "Removed")
        expectUnsupported(["normalizer": ["type": "BertNormalizer"]], naming: "normalizer.BertNormalizer")
        expectUnsupported(["decoder": ["type": "WordPiece"]], naming: "decoder.WordPiece")
        expectUnsupported(["post_processor": ["type": "Custom"]], naming: "post_processor.Custom")
        var vocab: [String: Int] = [:]
        for (i, s) in ByteLevel.byteToScalar.enumerated() { vocab[String(s)] = i }
        expectUnsupported(["model": ["type": "BPE", "vocab": vocab, "merges": [], "byte_fallback": true] as [String: Any]],
                          naming: "byte_fallback")
        XCTAssertThrowsError(try Tokenizer(tokenizerJSON: Data("{".utf8)))
        // Ids that would size an array or overflow Int32 are errors, not an out-of-memory or a
        // trap (found by the tokenizer fuzzer: a vocab id of 10^12).
        for id in [1_000_000_000_000, 3_000_000_000, -1] {
            var v = vocab
            v["ab"] = id
            XCTAssertThrowsError(try make(["model": ["type": "BPE", "vocab": v, "merges": []] as [String: Any]]), "vocab id \(id)") { e in
                guard case .malformed = e as? TokenizerError else { return XCTFail("\(e)") }
            }
            XCTAssertThrowsError(try make([:], added: [["id": id, "content": "<x>", "special": true]]), "added id \(id)")
        }
        XCTAssertThrowsError(try make(["post_processor": ["type": "BertProcessing", "cls": ["[CLS]", 5_000_000_000], "sep": ["[SEP]", 1]]]))
        XCTAssertThrowsError(try Tokenizer(directory: "/nonexistent")) { e in XCTAssertTrue("\(e)".contains("/nonexistent")) }
    }

    func testMergesInBothFormatsAndNormalizers() throws {
        let t = try make([:])
        XCTAssertEqual(try t.encode("ab a", addSpecialTokens: false), [256, 257])
        let nfc = try make(["normalizer": ["type": "NFC"]])
        let nfd = try make(["normalizer": ["type": "NFD"]])
        XCTAssertEqual(try nfc.decode(try nfc.encode("e\u{301}", addSpecialTokens: false)), "\u{e9}")
        XCTAssertEqual(try nfd.decode(try nfd.encode("\u{e9}", addSpecialTokens: false)).unicodeScalars.count, 2)
        let seq = try make(["normalizer": ["type": "Sequence", "normalizers": [["type": "Lowercase"], ["type": "Prepend", "prepend": "x"]]]])
        XCTAssertEqual(try seq.decode(try seq.encode("AB", addSpecialTokens: false)), "xab")
    }

    /// The heap-based merge against the definition (repeatedly merge the lowest-ranked adjacent
    /// pair, leftmost on ties) on random merge tables over a 3-letter alphabet, where chains,
    /// overlaps ("aaa") and ties are frequent; and a one-word 300,000-character text.
    func testMergesFollowTheDefinitionOnLongWords() throws {
        var rng = SeededRandom(seed: 7)
        for trial in 0..<40 {
            var tokens = ["a", "b", "c"]
            var merges: [(String, String)] = []
            var seen = Set<String>()
            while merges.count < 12 {
                let l = tokens[Int(rng.next() % UInt64(tokens.count))], r = tokens[Int(rng.next() % UInt64(tokens.count))]
                guard (l + r).count <= 6, seen.insert(l + " " + r).inserted else { continue }
                merges.append((l, r))
                if !tokens.contains(l + r) { tokens.append(l + r) }
            }
            var vocab: [String: Int] = [:]
            for (i, s) in ByteLevel.byteToScalar.enumerated() { vocab[String(s)] = i }
            for t in tokens where vocab[t] == nil { vocab[t] = vocab.count }
            let t = try make(["pre_tokenizer": ["type": "ByteLevel", "add_prefix_space": false, "use_regex": false],
                              "model": ["type": "BPE", "vocab": vocab, "merges": merges.map { "\($0.0) \($0.1)" }] as [String: Any]])
            for _ in 0..<5 {
                let word = String((0..<(1 + Int(rng.next() % 200))).map { _ in "abc".randomElement(using: &rng)! })
                var pieces = word.map { String($0) }
                while true {
                    var best = Int.max, at = -1
                    for i in 0..<max(0, pieces.count - 1) {
                        if let r = merges.firstIndex(where: { $0 == (pieces[i], pieces[i + 1]) }), r < best { best = r; at = i }
                    }
                    if at < 0 { break }
                    pieces[at] += pieces[at + 1]
                    pieces.remove(at: at + 1)
                }
                XCTAssertEqual(try t.encode(word, addSpecialTokens: false), pieces.map { Int32(vocab[$0]!) }, "trial \(trial): \(word)")
            }
        }
        let t = try make(["pre_tokenizer": ["type": "ByteLevel", "add_prefix_space": false, "use_regex": false]])
        let long = String(repeating: "ab", count: 150_000)
        XCTAssertEqual(try t.encode(long, addSpecialTokens: false), [Int32](repeating: 256, count: 150_000))
    }

    func testAddedTokenOptions() throws {
        let added: [[String: Any]] = [
            ["id": 300, "content": "<s>", "special": true, "normalized": false],
            ["id": 301, "content": "<mask>", "special": true, "lstrip": true, "rstrip": false, "normalized": false],
            ["id": 302, "content": "cat", "special": false, "single_word": true, "normalized": false],
        ]
        let t = try make([:], added: added)
        XCTAssertEqual(try t.encode("<s>ab", addSpecialTokens: false), [300, 256])
        // lstrip swallows the spaces before <mask>.
        XCTAssertEqual(try t.encode("ab  <mask>", addSpecialTokens: false), [256, 301])
        // single_word: "cat" inside "cats" is not the added token.
        XCTAssertEqual(try t.encode("cat", addSpecialTokens: false), [302])
        XCTAssertFalse(try t.encode("cats", addSpecialTokens: false).contains(302))
        XCTAssertEqual(try t.decode([300, 256], skipSpecialTokens: true), "ab")
        XCTAssertEqual(try t.decode([300, 256]), "<s>ab")
        let templated = try make(["post_processor": ["type": "TemplateProcessing",
            "single": [["SpecialToken": ["id": "<s>", "type_id": 0]], ["Sequence": ["id": "A", "type_id": 0]]],
            "special_tokens": ["<s>": ["id": "<s>", "ids": [300], "tokens": ["<s>"]]]]], added: added)
        XCTAssertEqual(try templated.encode("ab"), [300, 256])
        XCTAssertEqual(try templated.encode("ab", addSpecialTokens: false), [256])
    }

    func testStreamingHoldsIncompleteSequences() throws {
        let t = try make([:])
        // "€" is three bytes; fed one byte-token at a time, nothing is emitted until it completes.
        let ids = Array("€!".utf8).map { Int32($0) }
        var s = t.makeStreamingDecoder()
        XCTAssertEqual(try s.append(ids[0]), "")
        XCTAssertEqual(try s.append(ids[1]), "")
        XCTAssertEqual(try s.append(ids[2]), "€")
        XCTAssertEqual(try s.append(ids[3]), "!")
        // An invalid byte is emitted as U+FFFD at once; an unfinished tail at finish().
        var s2 = t.makeStreamingDecoder()
        XCTAssertEqual(try s2.append(0xFF), "\u{FFFD}")
        XCTAssertEqual(try s2.append(0xE2), "")
        XCTAssertEqual(s2.finish(), "\u{FFFD}")
    }
}

/// The exact pattern strings the library recognizes (kept here so tests do not depend on
/// internal names).
enum SplitPatternSources {
    static let qwen2 = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
}
