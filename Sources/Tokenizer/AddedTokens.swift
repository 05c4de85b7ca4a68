// tokenizer.json `added_tokens`: tokens matched in the raw text before normalization and
// pre-tokenization (leftmost, then longest), such as `<|im_start|>`. `special` ones can be
// skipped when decoding; `lstrip` / `rstrip` absorb neighbouring whitespace; `single_word`
// requires word boundaries; `normalized` ones are matched in the normalized text instead.

struct AddedToken: Sendable {
    let id: Int32
    let content: String
    let isSpecial: Bool
    let lstrip: Bool
    let rstrip: Bool
    let singleWord: Bool
    let isNormalized: Bool

    init(json: [String: Any], path: String) throws {
        guard let id = json["id"] as? Int, let content = json["content"] as? String, !content.isEmpty else {
            throw TokenizerError.malformed(path: path, reason: "an added token lacks an id or content")
        }
        guard id >= 0, id < 1 << 24 else {
            throw TokenizerError.malformed(path: path, reason: "added token '\(content)' has id \(id), outside 0..<\(1 << 24)")
        }
        self.id = Int32(id)
        self.content = content
        isSpecial = json["special"] as? Bool ?? false
        lstrip = json["lstrip"] as? Bool ?? false
        rstrip = json["rstrip"] as? Bool ?? false
        singleWord = json["single_word"] as? Bool ?? false
        isNormalized = json["normalized"] as? Bool ?? !isSpecial
    }
}

/// Text cut into plain segments and matched added tokens.
enum Segment {
    case text(Substring)
    case token(Int32)
}

/// Finds added tokens in text; one matcher per phase (raw text / normalized text).
struct AddedTokenMatcher: Sendable {
    private let byFirstByte: [UInt8: [AddedToken]]   // longest first

    init(_ tokens: [AddedToken]) {
        var map: [UInt8: [AddedToken]] = [:]
        for t in tokens { map[t.content.utf8.first!, default: []].append(t) }
        for k in map.keys { map[k]!.sort { $0.content.utf8.count > $1.content.utf8.count } }
        byFirstByte = map
    }

    var isEmpty: Bool { byFirstByte.isEmpty }

    /// Splits `text` at every added-token match, leftmost first, longest at a position.
    func split(_ text: Substring) -> [Segment] {
        if byFirstByte.isEmpty || text.isEmpty { return [.text(text)] }
        let utf8 = text.utf8
        var segments: [Segment] = []
        var plainStart = utf8.startIndex
        var i = utf8.startIndex
        while i < utf8.endIndex {
            guard let candidates = byFirstByte[utf8[i]], let (token, end) = firstMatch(candidates, text, at: i) else {
                i = utf8.index(after: i)
                continue
            }
            var matchStart = i, matchEnd = end
            if token.lstrip {
                while matchStart > plainStart, let prev = Self.scalarBefore(text, matchStart), prev.properties.isWhitespace {
                    matchStart = text.unicodeScalars.index(before: matchStart)
                }
            }
            if token.rstrip {
                var s = text.unicodeScalars[matchEnd...].makeIterator()
                while let next = s.next(), next.properties.isWhitespace {
                    matchEnd = text.unicodeScalars.index(after: matchEnd)
                }
            }
            if matchStart > plainStart { segments.append(.text(text[plainStart..<matchStart])) }
            segments.append(.token(token.id))
            plainStart = matchEnd
            i = matchEnd
        }
        if plainStart < utf8.endIndex { segments.append(.text(text[plainStart...])) }
        return segments
    }

    private func firstMatch(_ candidates: [AddedToken], _ text: Substring,
                            at i: Substring.Index) -> (AddedToken, Substring.Index)? {
        let utf8 = text.utf8
        for t in candidates {
            var j = i
            var ok = true
            for b in t.content.utf8 {
                guard j < utf8.endIndex, utf8[j] == b else { ok = false; break }
                j = utf8.index(after: j)
            }
            guard ok else { continue }
            // A match must end on a character boundary of the text.
            guard j == utf8.endIndex || (utf8[j] & 0xC0) != 0x80 else { continue }
            if t.singleWord {
                let before = Self.scalarBefore(text, i), after = j < utf8.endIndex ? text.unicodeScalars[j] : nil
                if let b = before, Self.isWordScalar(b) { continue }
                if let a = after, Self.isWordScalar(a) { continue }
            }
            return (t, j)
        }
        return nil
    }

    private static func scalarBefore(_ text: Substring, _ i: Substring.Index) -> Unicode.Scalar? {
        i > text.startIndex ? text.unicodeScalars[text.unicodeScalars.index(before: i)] : nil
    }

    private static func isWordScalar(_ s: Unicode.Scalar) -> Bool {
        s == "_" || s.properties.isAlphabetic || s.properties.numericType != nil
    }
}
