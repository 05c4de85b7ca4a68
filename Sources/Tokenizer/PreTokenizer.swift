// tokenizer.json `pre_tokenizer`: ByteLevel (optionally splitting with GPT-2's regex), Split with
// a supported pattern and the Isolated behaviour, and Sequence of those. Pre-tokenization turns
// one normalized segment into the byte-level strings that BPE encodes.

indirect enum PreTokenizer: Sendable {
    /// Maps bytes to GPT-2's printable alphabet; `splitPattern` is GPT-2's regex when use_regex.
    case byteLevel(addPrefixSpace: Bool, splitPattern: SplitPattern?)
    case split(SplitPattern)
    case sequence([PreTokenizer])

    init(json: [String: Any]) throws {
        let type = json["type"] as? String ?? "(no type)"
        switch type {
        case "ByteLevel":
            let useRegex = json["use_regex"] as? Bool ?? true
            self = .byteLevel(addPrefixSpace: json["add_prefix_space"] as? Bool ?? true,
                              splitPattern: useRegex ? .gpt2 : nil)
        case "Split":
            guard let pattern = json["pattern"] as? [String: Any], let source = pattern["Regex"] as? String else {
                throw TokenizerError.unsupported(component: "pre_tokenizer.Split", hint: "only Regex patterns are supported")
            }
            guard let p = SplitPattern(source: source) else {
                throw TokenizerError.unsupported(component: "pre_tokenizer.Split pattern \"\(source)\"",
                    hint: "supported: the GPT-2, Llama 3 and Qwen2 patterns")
            }
            let behavior = json["behavior"] as? String ?? "Isolated"
            guard behavior == "Isolated", !(json["invert"] as? Bool ?? false) else {
                throw TokenizerError.unsupported(component: "pre_tokenizer.Split behavior \(behavior)",
                    hint: "supported: Isolated, invert false")
            }
            self = .split(p)
        case "Sequence":
            let list = json["pretokenizers"] as? [[String: Any]] ?? []
            self = .sequence(try list.map { try PreTokenizer(json: $0) })
        default:
            throw TokenizerError.unsupported(component: "pre_tokenizer.\(type)",
                hint: "supported: ByteLevel, Split (GPT-2, Llama 3, Qwen2 patterns), Sequence")
        }
    }

    /// Appends the pre-tokens of `text` to `out`.
    func run(_ text: String, into out: inout [String]) {
        var pieces = [text]
        var mapped = false
        apply(&pieces, &mapped)
        if mapped { out.append(contentsOf: pieces) } else { out.append(contentsOf: pieces.map { ByteLevel.encode($0[...]) }) }
    }

    /// Splits pieces in place; `mapped` records whether the byte-level map was applied.
    private func apply(_ pieces: inout [String], _ mapped: inout Bool) {
        switch self {
        case let .sequence(list):
            for p in list { p.apply(&pieces, &mapped) }
        case let .split(pattern):
            pieces = pieces.flatMap { Self.split($0, pattern) }
        case let .byteLevel(addPrefixSpace, pattern):
            var result: [String] = []
            for (k, piece) in pieces.enumerated() {
                var text = piece
                if addPrefixSpace && k == 0 && !text.hasPrefix(" ") { text = " " + text }
                let parts = pattern.map { Self.split(text, $0) } ?? [text]
                result.append(contentsOf: parts.map { ByteLevel.encode($0[...]) })
            }
            pieces = result
            mapped = true
        }
    }

    static func split(_ text: String, _ pattern: SplitPattern) -> [String] {
        let scalars = Array(text.unicodeScalars)
        if scalars.isEmpty { return [] }
        let classes = scalars.map { ScalarClass.of($0) }
        var ends: [Int] = []
        pattern.split(scalars, classes, into: &ends)
        var out: [String] = []
        out.reserveCapacity(ends.count)
        var start = 0
        for e in ends {
            var v = String.UnicodeScalarView()
            v.append(contentsOf: scalars[start..<e])
            out.append(String(v))
            start = e
        }
        return out
    }
}
