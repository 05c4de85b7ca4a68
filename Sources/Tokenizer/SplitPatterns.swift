// The pre-tokenizer regexes of GPT-2, Llama 3 and Qwen2, as hand-written matchers with the
// same semantics as the Oniguruma regexes the Rust `tokenizers` library runs: alternatives tried
// in order at each position, greedy quantifiers with backtracking, Unicode classes \p{L}
// (letters), \p{N} (numbers) and \s (White_Space). Every position starts a match (each scalar is
// a letter, a number, whitespace or "other"), so a text splits into consecutive pieces.

/// A supported Split (or ByteLevel use_regex) pattern.
public enum SplitPattern: Sendable, Equatable {
    case gpt2, llama3, qwen2

    static let gpt2Source = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let llama3Source = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let qwen2Source = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    /// The pattern for a regex source string from tokenizer.json, if supported.
    public init?(source: String) {
        switch source {
        case Self.gpt2Source: self = .gpt2
        case Self.llama3Source: self = .llama3
        case Self.qwen2Source: self = .qwen2
        default: return nil
        }
    }
}

/// Character classes the patterns distinguish.
struct ScalarClass: OptionSet {
    let rawValue: UInt8
    static let letter = ScalarClass(rawValue: 1)
    static let number = ScalarClass(rawValue: 2)
    static let space = ScalarClass(rawValue: 4)        // \s
    static let lineBreak = ScalarClass(rawValue: 8)    // \r or \n (also space)
    static let other: ScalarClass = []

    private static let ascii: [ScalarClass] = (0..<128).map { classify(Unicode.Scalar(UInt8($0))) }

    @inline(__always)
    static func of(_ s: Unicode.Scalar) -> ScalarClass {
        s.value < 128 ? ascii[Int(s.value)] : classify(s)
    }

    static func classify(_ s: Unicode.Scalar) -> ScalarClass {
        if s == "\r" || s == "\n" { return [.space, .lineBreak] }
        let p = s.properties
        if p.isWhitespace { return .space }
        switch p.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return .letter
        case .decimalNumber, .letterNumber, .otherNumber: return .number
        default: return .other
        }
    }
}

extension SplitPattern {
    /// Splits `s` (scalars with their classes) into consecutive pieces; returns piece end indices.
    func split(_ s: [Unicode.Scalar], _ c: [ScalarClass], into ends: inout [Int]) {
        var i = 0
        let n = s.count
        while i < n {
            let e = match(s, c, at: i)
            ends.append(e)
            i = e
        }
    }

    /// End of the match starting at i (always > i).
    @inline(__always)
    private func match(_ s: [Unicode.Scalar], _ c: [ScalarClass], at i: Int) -> Int {
        let n = s.count
        @inline(__always) func run(_ from: Int, _ cls: ScalarClass) -> Int {
            var j = from
            while j < n && c[j].contains(cls) { j += 1 }
            return j
        }
        @inline(__always) func runOther(_ from: Int) -> Int {
            var j = from
            while j < n && c[j] == .other { j += 1 }
            return j
        }
        @inline(__always) func runLineBreaks(_ from: Int) -> Int {
            var j = from
            while j < n && c[j].contains(.lineBreak) { j += 1 }
            return j
        }
        // Contractions: 's 't 're 've 'm 'll 'd (case-insensitive except for GPT-2).
        if s[i] == "'" && i + 1 < n {
            if let e = contraction(s, i + 1, caseInsensitive: self != .gpt2) { return e }
        }
        switch self {
        case .gpt2:
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
            let start = (s[i] == " " && i + 1 < n) ? i + 1 : i
            for cls in [ScalarClass.letter, .number] {
                if c[start].contains(cls) { return run(start, cls) }
                if start != i && c[i].contains(cls) { return run(i, cls) }
            }
            if c[start] == .other { return runOther(start) }
            if start != i && c[i] == .other { return runOther(i) }
        case .llama3, .qwen2:
            // `[^\r\n\p{L}\p{N}]?\p{L}+`
            if !c[i].contains(.lineBreak) && !c[i].contains(.letter) && !c[i].contains(.number)
                && i + 1 < n && c[i + 1].contains(.letter) {
                return run(i + 1, .letter)
            }
            if c[i].contains(.letter) { return run(i, .letter) }
            // `\p{N}{1,3}` (Llama 3) or `\p{N}` (Qwen2)
            if c[i].contains(.number) {
                if self == .qwen2 { return i + 1 }
                var j = i + 1
                while j < n && j < i + 3 && c[j].contains(.number) { j += 1 }
                return j
            }
            // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
            if s[i] == " " && i + 1 < n && c[i + 1] == .other { return runLineBreaks(runOther(i + 1)) }
            if c[i] == .other { return runLineBreaks(runOther(i)) }
            // `\s*[\r\n]+`: the whitespace run up to and including its last line break.
            if c[i].contains(.space) {
                let j = run(i, .space)
                var k = j - 1
                while k >= i && !c[k].contains(.lineBreak) { k -= 1 }
                if k >= i { return k + 1 }
            }
        }
        // `\s+(?!\S)` then `\s+`: a whitespace run, leaving its last character to the next
        // piece when a non-space follows (unless the run is a single character).
        let j = run(i, .space)
        if j == n || j - i == 1 { return j }
        return j - 1
    }

    /// End of a contraction whose letters start at `i`, if any.
    @inline(__always)
    private func contraction(_ s: [Unicode.Scalar], _ i: Int, caseInsensitive: Bool) -> Int? {
        @inline(__always) func at(_ k: Int) -> UInt32? {
            guard k < s.count else { return nil }
            let v = s[k].value
            if caseInsensitive && v >= 0x41 && v <= 0x5A { return v + 0x20 }
            return v
        }
        switch at(i) {
        case 0x73, 0x74, 0x6D, 0x64: return i + 1                                   // s t m d
        case 0x72, 0x76: return at(i + 1) == 0x65 ? i + 2 : nil                     // re ve
        case 0x6C: return at(i + 1) == 0x6C ? i + 2 : nil                           // ll
        default: return nil
        }
    }
}
