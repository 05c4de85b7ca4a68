// tokenizer.json `decoder` (ByteLevel): token strings back to bytes, then UTF-8 with U+FFFD for
// invalid sequences (as Rust's from_utf8_lossy). `StreamingDecoder` emits text token by token
// and never splits a UTF-8 sequence that may still complete.

enum Decoder: Sendable {
    case byteLevel

    init(json: [String: Any]) throws {
        let type = json["type"] as? String ?? "(no type)"
        guard type == "ByteLevel" else {
            throw TokenizerError.unsupported(component: "decoder.\(type)", hint: "supported: ByteLevel")
        }
        self = .byteLevel
    }
}

/// Incremental detokenization for streaming: `append(id)` returns the text that became final.
/// The concatenation of all returned pieces plus `finish()` equals `decode` of all ids.
public struct StreamingDecoder {
    let tokenizer: Tokenizer
    let skipSpecialTokens: Bool
    private var pending: [UInt8] = []

    init(tokenizer: Tokenizer, skipSpecialTokens: Bool) {
        self.tokenizer = tokenizer
        self.skipSpecialTokens = skipSpecialTokens
    }

    /// Adds one token; returns the newly completed text (possibly empty).
    public mutating func append(_ id: Int32) throws -> String {
        try tokenizer.appendBytes(of: id, skipSpecial: skipSpecialTokens, to: &pending)
        let keep = Self.incompleteSuffixLength(pending)
        let ready = pending.count - keep
        if ready == 0 { return "" }
        let text = String(decoding: pending[0..<ready], as: UTF8.self)
        pending.removeFirst(ready)
        return text
    }

    /// Emits whatever is left (an unfinished sequence becomes U+FFFD).
    public mutating func finish() -> String {
        defer { pending = [] }
        return String(decoding: pending, as: UTF8.self)
    }

    /// Length of a trailing sequence that is a valid but incomplete UTF-8 prefix (0-3 bytes).
    static func incompleteSuffixLength(_ b: [UInt8]) -> Int {
        let n = b.count
        for back in 1...min(3, max(1, n)) where n >= back {
            let lead = b[n - back]
            if lead & 0xC0 == 0x80 { continue }          // continuation: look further back
            let need: Int
            switch lead {
            case 0xC2...0xDF: need = 2
            case 0xE0...0xEF: need = 3
            case 0xF0...0xF4: need = 4
            default: return 0
            }
            guard back < need else { return 0 }           // complete (or over-long: invalid)
            // The bytes after the lead must be valid continuations for it.
            for k in 1..<back {
                let c = b[n - back + k]
                var lo: UInt8 = 0x80, hi: UInt8 = 0xBF
                if k == 1 {
                    switch lead {
                    case 0xE0: lo = 0xA0
                    case 0xED: hi = 0x9F
                    case 0xF0: lo = 0x90
                    case 0xF4: hi = 0x8F
                    default: break
                    }
                }
                if c < lo || c > hi { return 0 }
            }
            return back
        }
        return 0
    }
}
