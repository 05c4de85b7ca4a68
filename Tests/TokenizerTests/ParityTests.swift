// Exact parity with the Rust `tokenizers` library on 5,000+ held-out strings for three trained
// byte-level BPE tokenizers (GPT-2, Qwen2 and Llama 3 pre-tokenizer regexes); see
// scripts/make_tokenizer_fixtures.py.
import Foundation
import TestSupport
import Tokenizer
import XCTest

final class ParityTests: XCTestCase {
    static let names = ["gpt2", "qwen2", "llama3"]

    nonisolated(unsafe) static let cases: [[String: Any]] = {
        let data = FileManager.default.contents(atPath: fixturesDirectory + "/tokenizers/cases.json")!
        return try! JSONSerialization.jsonObject(with: data) as! [[String: Any]]
    }()

    func load(_ name: String) throws -> Tokenizer {
        try Tokenizer(directory: fixturesDirectory + "/tokenizers/" + name)
    }

    func testEncodingMatchesTokenizersExactly() throws {
        XCTAssertGreaterThanOrEqual(Self.cases.count, 5000)
        for name in Self.names {
            let tok = try load(name)
            var mismatches = 0, tokens = 0
            for c in Self.cases {
                let text = c["text"] as! String
                let want = (c[name] as! [Int]).map(Int32.init)
                let got = try tok.encode(text, addSpecialTokens: false)
                tokens += want.count
                if got != want {
                    mismatches += 1
                    if mismatches <= 3 { XCTFail("\(name): \(text.debugDescription)\n got  \(got)\n want \(want)") }
                }
                let wantSpecial = (c[name + "+special"] as? [Int]).map { $0.map(Int32.init) } ?? want
                let gotSpecial = try tok.encode(text, addSpecialTokens: true)
                if gotSpecial != wantSpecial {
                    mismatches += 1
                    if mismatches <= 3 { XCTFail("\(name) with special tokens: \(text.debugDescription)") }
                }
            }
            XCTAssertEqual(mismatches, 0, "\(name): \(mismatches) of \(Self.cases.count) strings differ")
            print("\(name): \(Self.cases.count) strings, \(tokens) tokens, \(mismatches) mismatches")
        }
    }

    func testDecodingRoundTripsAndMatches() throws {
        for name in Self.names {
            let tok = try load(name)
            var failures = 0
            for c in Self.cases {
                let text = c["text"] as! String
                let ids = (c[name] as! [Int]).map(Int32.init)
                let expected = c[name + ":decoded"] as? String ?? text
                let got = try tok.decode(ids, skipSpecialTokens: true)
                if got != expected {
                    failures += 1
                    if failures <= 3 { XCTFail("\(name) decode: \(got.debugDescription) vs \(expected.debugDescription)") }
                }
                // Without skipping, decoding is the exact inverse of encoding.
                if try tok.decode(ids) != text {
                    failures += 1
                    if failures <= 3 { XCTFail("\(name) round trip: \(text.debugDescription)") }
                }
            }
            XCTAssertEqual(failures, 0, name)
        }
    }

    /// Streaming pieces never contain a broken sequence, and concatenate to the full decode.
    func testStreamingDecodeEqualsFullDecode() throws {
        for name in Self.names {
            let tok = try load(name)
            for c in Self.cases.prefix(2000) {
                let ids = (c[name] as! [Int]).map(Int32.init)
                var stream = tok.makeStreamingDecoder()
                var text = ""
                for id in ids {
                    let piece = try stream.append(id)
                    XCTAssertFalse(piece.unicodeScalars.contains("\u{FFFD}") && !(c["text"] as! String).contains("\u{FFFD}"),
                                   "streaming emitted a replacement character")
                    text += piece
                }
                text += stream.finish()
                XCTAssertEqual(text, try tok.decode(ids))
            }
        }
    }

    func testSpecialTokensAndConfig() throws {
        let qwen = try load("qwen2")
        XCTAssertEqual(try qwen.encode("<|im_start|>user<|im_end|>", addSpecialTokens: false).first, 1)
        XCTAssertEqual(qwen.eosTokenIds, [qwen.tokenId(for: "<|im_end|>")!])
        XCTAssertEqual(qwen.padTokenId, qwen.tokenId(for: "<|endoftext|>"))
        XCTAssertNil(qwen.bosTokenId)
        XCTAssertTrue(qwen.isSpecial(0))
        let llama = try load("llama3")
        XCTAssertEqual(llama.bosTokenId, 0)
        XCTAssertEqual(try llama.encode("hi", addSpecialTokens: true).first, 0)
        XCTAssertEqual(llama.eosTokenIds, [llama.tokenId(for: "<|eot_id|>")!])
        XCTAssertThrowsError(try llama.decode([Int32(llama.vocabSize)]))
    }
}
