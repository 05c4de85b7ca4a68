// Jinja source to a tree: the template is cut into text and tags with Jinja's whitespace rules
// as Hugging Face configures them (trim_blocks, lstrip_blocks, `-` markers), tags are tokenized
// and parsed by recursive descent with Jinja's operator precedence. Anything outside the
// supported language is an error naming its line.
import Foundation

public struct TemplateError: Error, CustomStringConvertible, Equatable {
    public let line: Int
    public let message: String
    /// Raised by the template itself (`raise_exception`).
    public var raised = false
    public init(line: Int, message: String, raised: Bool = false) { self.line = line; self.message = message; self.raised = raised }
    public var description: String { line > 0 ? "template line \(line): \(message)" : message }
}

indirect enum Expr {
    case literal(JValue)
    case name(String)
    case attr(Expr, String)
    case item(Expr, Expr)
    case slice(Expr, Expr?, Expr?, Expr?)
    case call(Expr, [Expr], [(String, Expr)])
    case filter(Expr, String, [Expr], [(String, Expr)])
    case test(Expr, String, [Expr], negated: Bool)
    case unary(String, Expr)
    case binary(String, Expr, Expr)
    case and(Expr, Expr)
    case or(Expr, Expr)
    case not(Expr)
    case conditional(Expr, Expr, Expr?)
    case list([Expr])
    case dict([(Expr, Expr)])
}

enum SetTarget {
    case names([String])
    case attribute(String, String)
}

indirect enum Node {
    case text(String)
    case output(Expr, line: Int)
    case ifs([(Expr, [Node])], elseBody: [Node], line: Int)
    case forLoop(targets: [String], iterable: Expr, condition: Expr?, body: [Node], elseBody: [Node], line: Int)
    case set(SetTarget, Expr, line: Int)
    case setBlock(String, [Node], line: Int)
    case macro(String, [(String, Expr?)], [Node], line: Int)
    case callBlock(Expr, [Node], line: Int)
    case filterBlock(String, [Expr], [Node], line: Int)
    case breakLoop(line: Int)
    case continueLoop(line: Int)
    /// `{% generation %}` (Hugging Face's assistant-mask extension): renders its body.
    case block([Node])
}

// MARK: - Cutting the source into text and tags

struct Segment {
    enum Kind { case text, output, statement }
    let kind: Kind
    let body: String
    let line: Int
}

func segments(_ source: String) throws -> [Segment] {
    let s = Array(source.unicodeScalars)
    var out: [Segment] = []
    var text: [Unicode.Scalar] = []
    var i = 0, line = 1
    var stripNextWhitespace = false, trimNextNewline = false
    var textStart = 0
    func flushText() {
        if !text.isEmpty { out.append(Segment(kind: .text, body: String(String.UnicodeScalarView(text)), line: line)) }
        text.removeAll()
    }
    func isSpace(_ c: Unicode.Scalar) -> Bool { c == " " || c == "\t" || c == "\n" || c == "\r" }
    while i < s.count {
        if stripNextWhitespace {
            while i < s.count && isSpace(s[i]) { if s[i] == "\n" { line += 1 }; i += 1 }
            stripNextWhitespace = false
            continue
        }
        if trimNextNewline {
            trimNextNewline = false
            if i < s.count && s[i] == "\n" { line += 1; i += 1; continue }
            if i + 1 < s.count && s[i] == "\r" && s[i + 1] == "\n" { line += 1; i += 2; continue }
        }
        guard s[i] == "{", i + 1 < s.count, s[i + 1] == "{" || s[i + 1] == "%" || s[i + 1] == "#" else {
            if s[i] == "\n" { line += 1 }
            if text.isEmpty { textStart = i }
            text.append(s[i]); i += 1
            continue
        }
        let opener = s[i + 1]
        let tagLine = line
        var j = i + 2
        let stripBefore = j < s.count && s[j] == "-"
        let keepBefore = j < s.count && s[j] == "+"
        if stripBefore || keepBefore { j += 1 }
        if stripBefore {
            while let last = text.last, isSpace(last) { text.removeLast() }
        } else if opener != "{" && !keepBefore {
            // lstrip_blocks: spaces and tabs between a line start and a block or comment tag go.
            // A line starts after a newline in the text, or where the text began if the source
            // has a newline (or the template's start) just before it.
            var k = text.count
            while k > 0 && (text[k - 1] == " " || text[k - 1] == "\t") { k -= 1 }
            let begin = text.isEmpty ? i : textStart
            if k > 0 ? text[k - 1] == "\n" : (begin == 0 || s[begin - 1] == "\n") { text.removeSubrange(k...) }
        }
        // Find the closing delimiter, skipping string literals inside expressions and statements.
        let closer: Unicode.Scalar = opener == "{" ? "}" : opener == "%" ? "%" : "#"
        var quote: Unicode.Scalar? = nil
        var end = -1
        var k = j
        while k + 1 < s.count {
            let c = s[k]
            if opener != "#" {
                if let q = quote {
                    if c == "\\" { k += 2; continue }
                    if c == q { quote = nil }
                    k += 1; continue
                }
                if c == "'" || c == "\"" { quote = c; k += 1; continue }
            }
            if c == closer && s[k + 1] == "}" { end = k; break }
            k += 1
        }
        guard end >= 0 else { throw TemplateError(line: tagLine, message: "unclosed tag '{\(opener)'") }
        var bodyEnd = end
        let stripAfter = bodyEnd > j && s[bodyEnd - 1] == "-"
        if stripAfter || (bodyEnd > j && s[bodyEnd - 1] == "+") { bodyEnd -= 1 }
        let body = String(String.UnicodeScalarView(s[j..<max(j, bodyEnd)]))
        for c in s[i..<(end + 2)] where c == "\n" { line += 1 }
        i = end + 2
        if opener == "#" {
            flushText()   // the text after a comment is its own run (lstrip_blocks looks at its own line start)
            if stripAfter { stripNextWhitespace = true } else { trimNextNewline = true }
            continue
        }
        if opener == "%" && body.trimmingCharacters(in: .whitespaces) == "raw" {
            throw TemplateError(line: tagLine, message: "{% raw %} blocks are not supported")
        }
        flushText()
        out.append(Segment(kind: opener == "{" ? .output : .statement, body: body, line: tagLine))
        if stripAfter { stripNextWhitespace = true } else if opener == "%" { trimNextNewline = true }
    }
    flushText()
    return out
}

// MARK: - Tokens inside a tag

enum Token: Equatable {
    case name(String)
    case string(String)
    case int(Int)
    case float(Double)
    case op(String)
    case end
}

func tokenize(_ src: String, line: Int) throws -> [Token] {
    let s = Array(src.unicodeScalars)
    var out: [Token] = []
    var i = 0
    let ops3 = ["**=", "//="], ops2 = ["==", "!=", "<=", ">=", "//", "**"]
    while i < s.count {
        let c = s[i]
        if c == " " || c == "\t" || c == "\n" || c == "\r" { i += 1; continue }
        if CharacterSet.letters.contains(c) || c == "_" {
            var j = i
            while j < s.count && (CharacterSet.alphanumerics.contains(s[j]) || s[j] == "_") { j += 1 }
            out.append(.name(String(String.UnicodeScalarView(s[i..<j])))); i = j; continue
        }
        if CharacterSet.decimalDigits.contains(c) {
            var j = i, isFloat = false
            while j < s.count && (CharacterSet.decimalDigits.contains(s[j]) || s[j] == "_") { j += 1 }
            if j + 1 < s.count && s[j] == "." && CharacterSet.decimalDigits.contains(s[j + 1]) {
                isFloat = true; j += 1
                while j < s.count && CharacterSet.decimalDigits.contains(s[j]) { j += 1 }
            }
            if j < s.count && (s[j] == "e" || s[j] == "E") {
                var k = j + 1
                if k < s.count && (s[k] == "+" || s[k] == "-") { k += 1 }
                if k < s.count && CharacterSet.decimalDigits.contains(s[k]) {
                    isFloat = true; j = k
                    while j < s.count && CharacterSet.decimalDigits.contains(s[j]) { j += 1 }
                }
            }
            let text = String(String.UnicodeScalarView(s[i..<j])).replacingOccurrences(of: "_", with: "")
            if isFloat { out.append(.float(Double(text)!)) } else {
                guard let v = Int(text) else { throw TemplateError(line: line, message: "integer \(text) is too large") }
                out.append(.int(v))
            }
            i = j; continue
        }
        if c == "'" || c == "\"" {
            var j = i + 1
            var v = String.UnicodeScalarView()
            while j < s.count && s[j] != c {
                if s[j] == "\\" && j + 1 < s.count {
                    let e = s[j + 1]
                    j += 2
                    switch e {
                    case "n": v.append("\n")
                    case "t": v.append("\t")
                    case "r": v.append("\r")
                    case "\\": v.append("\\")
                    case "'": v.append("'")
                    case "\"": v.append("\"")
                    case "0": v.append("\0")
                    case "u", "x", "U":
                        let width = e == "x" ? 2 : e == "u" ? 4 : 8
                        guard j + width <= s.count, let code = UInt32(String(String.UnicodeScalarView(s[j..<(j + width)])), radix: 16),
                              let scalar = Unicode.Scalar(code) else {
                            throw TemplateError(line: line, message: "bad \\\(e) escape in a string literal")
                        }
                        v.append(scalar); j += width
                    case "\n": break
                    default: v.append("\\"); v.append(e)
                    }
                    continue
                }
                v.append(s[j]); j += 1
            }
            guard j < s.count else { throw TemplateError(line: line, message: "unterminated string literal") }
            out.append(.string(String(v))); i = j + 1; continue
        }
        let rest = String(String.UnicodeScalarView(s[i..<min(s.count, i + 3)]))
        if let op = ops3.first(where: { rest.hasPrefix($0) }) { out.append(.op(op)); i += 3; continue }
        if let op = ops2.first(where: { rest.hasPrefix($0) }) { out.append(.op(op)); i += 2; continue }
        if "+-*/%~<>=()[]{}.,:|!".unicodeScalars.contains(c) { out.append(.op(String(c))); i += 1; continue }
        throw TemplateError(line: line, message: "unexpected character '\(c)'")
    }
    out.append(.end)
    return out
}

// MARK: - Expressions

struct ExprParser {
    var tokens: [Token]
    var pos = 0
    let line: Int

    init(_ src: String, line: Int) throws { tokens = try tokenize(src, line: line); self.line = line }

    var peek: Token { tokens[pos] }
    mutating func next() -> Token { defer { pos += 1 }; return tokens[pos] }
    func error(_ m: String) -> TemplateError { TemplateError(line: line, message: m) }
    func isOp(_ o: String) -> Bool { peek == .op(o) }
    func isName(_ n: String) -> Bool { peek == .name(n) }
    mutating func accept(_ o: String) -> Bool { if isOp(o) { pos += 1; return true }; return false }
    mutating func acceptName(_ n: String) -> Bool { if isName(n) { pos += 1; return true }; return false }
    mutating func expect(_ o: String) throws { guard accept(o) else { throw error("expected '\(o)', found \(describe(peek))") } }
    mutating func identifier() throws -> String {
        guard case let .name(n) = next() else { throw error("expected a name, found \(describe(tokens[pos - 1]))") }
        return n
    }
    func describe(_ t: Token) -> String {
        switch t {
        case let .name(n): return "'\(n)'"
        case let .string(s): return "string '\(s)'"
        case let .int(i): return "\(i)"
        case let .float(f): return "\(f)"
        case let .op(o): return "'\(o)'"
        case .end: return "the end of the tag"
        }
    }
    mutating func atEnd() throws { guard peek == .end else { throw error("unexpected \(describe(peek))") } }

    /// expression with an optional trailing `if ... else ...` and bare tuples (`a, b`).
    mutating func tuple() throws -> Expr {
        let first = try expression()
        guard isOp(",") else { return first }
        var items = [first]
        while accept(",") {
            if peek == .end || isOp(")") || isOp("]") || isOp("}") { break }
            items.append(try expression())
        }
        return .list(items)
    }

    mutating func expression() throws -> Expr {
        let value = try orExpr()
        if acceptName("if") {
            let cond = try orExpr()
            let other = acceptName("else") ? try expression() : nil
            return .conditional(cond, value, other)
        }
        return value
    }

    mutating func orExpr() throws -> Expr {
        var l = try andExpr()
        while acceptName("or") { l = .or(l, try andExpr()) }
        return l
    }
    mutating func andExpr() throws -> Expr {
        var l = try notExpr()
        while acceptName("and") { l = .and(l, try notExpr()) }
        return l
    }
    mutating func notExpr() throws -> Expr {
        if acceptName("not") { return .not(try notExpr()) }
        return try compare()
    }
    mutating func compare() throws -> Expr {
        var l = try concat()
        while true {
            if case let .op(o) = peek, ["==", "!=", "<", ">", "<=", ">="].contains(o) {
                pos += 1; l = .binary(o, l, try concat())
            } else if acceptName("in") {
                l = .binary("in", l, try concat())
            } else if isName("not"), tokens[pos + 1] == .name("in") {
                pos += 2; l = .not(.binary("in", l, try concat()))
            } else { return l }
        }
    }
    mutating func concat() throws -> Expr {
        var l = try additive()
        while accept("~") { l = .binary("~", l, try additive()) }
        return l
    }
    mutating func additive() throws -> Expr {
        var l = try multiplicative()
        while case let .op(o) = peek, o == "+" || o == "-" { pos += 1; l = .binary(o, l, try multiplicative()) }
        return l
    }
    mutating func multiplicative() throws -> Expr {
        var l = try power()
        while case let .op(o) = peek, ["*", "/", "//", "%"].contains(o) { pos += 1; l = .binary(o, l, try power()) }
        return l
    }
    /// `**` binds looser than unary minus in Jinja (-2 ** 2 is 4).
    mutating func power() throws -> Expr {
        var l = try unary()
        while accept("**") { l = .binary("**", l, try unary()) }
        return l
    }
    /// Unary minus binds tighter than filters and tests (-3 | abs is 3), as in Jinja.
    mutating func unary(withFilters: Bool = true) throws -> Expr {
        var e: Expr
        if accept("-") { e = .unary("-", try unary(withFilters: false)) }
        else if accept("+") { e = .unary("+", try unary(withFilters: false)) }
        else { e = try postfix() }
        return withFilters ? try filtered(e) : e
    }
    /// Filters (`|f(args)`) and tests (`is [not] t(args)`) applied to `e`.
    mutating func filtered(_ start: Expr) throws -> Expr {
        var e = start
        while true {
            if accept("|") {
                let name = try dottedName()
                let (a, k) = isOp("(") ? try callArguments() : ([], [])
                e = .filter(e, name, a, k)
            } else if acceptName("is") {
                let negated = acceptName("not")
                let name = try identifierOrKeyword()
                var args: [Expr] = []
                if isOp("(") { args = try callArguments().0 }
                else if startsPrimary() { args = [try postfix()] }
                e = .test(e, name, args, negated: negated)
            } else { return e }
        }
    }
    mutating func identifierOrKeyword() throws -> String {
        if case let .name(n) = peek { pos += 1; return n }
        if case let .op(o) = peek, ["==", "!=", "<", ">", "<=", ">="].contains(o) {
            pos += 1
            return ["==": "eq", "!=": "ne", "<": "lt", ">": "gt", "<=": "le", ">=": "ge"][o]!
        }
        throw error("expected a test name, found \(describe(peek))")
    }
    mutating func dottedName() throws -> String {
        var n = try identifier()
        while isOp("."), case .name = tokens[pos + 1] { pos += 1; n += "." + (try identifier()) }
        return n
    }
    func startsPrimary() -> Bool {
        switch peek {
        case .string, .int, .float: return true
        case let .name(n): return !["and", "or", "not", "in", "is", "if", "else"].contains(n)
        case let .op(o): return o == "[" || o == "{"
        case .end: return false
        }
    }
    mutating func callArguments() throws -> ([Expr], [(String, Expr)]) {
        try expect("(")
        var args: [Expr] = [], kwargs: [(String, Expr)] = []
        while !accept(")") {
            if case let .name(n) = peek, tokens[pos + 1] == .op("=") {
                pos += 2; kwargs.append((n, try expression()))
            } else {
                if accept("*") || accept("**") { throw error("*args and **kwargs in calls are not supported") }
                args.append(try expression())
            }
            if !accept(",") { try expect(")"); break }
        }
        return (args, kwargs)
    }
    mutating func postfix() throws -> Expr {
        var e = try primary()
        while true {
            if accept(".") {
                if case let .int(i) = peek { pos += 1; e = .item(e, .literal(.int(i))); continue }
                e = .attr(e, try identifier())
            } else if isOp("[") {
                pos += 1
                var parts: [Expr?] = [nil]
                var isSlice = false
                while !accept("]") {
                    if accept(":") { isSlice = true; parts.append(nil); continue }
                    parts[parts.count - 1] = try expression()
                }
                if isSlice {
                    guard parts.count <= 3 else { throw error("a slice has at most three parts") }
                    e = .slice(e, parts[0], parts.count > 1 ? parts[1] : nil, parts.count > 2 ? parts[2] : nil)
                } else {
                    guard let index = parts[0] else { throw error("empty subscript") }
                    e = .item(e, index)
                }
            } else if isOp("(") {
                let (a, k) = try callArguments()
                e = .call(e, a, k)
            } else { return e }
        }
    }
    mutating func primary() throws -> Expr {
        switch next() {
        case let .string(s):
            var v = s
            while case let .string(more) = peek { pos += 1; v += more }   // adjacent literals concatenate
            return .literal(.string(v))
        case let .int(i): return .literal(.int(i))
        case let .float(f): return .literal(.double(f))
        case let .name(n):
            switch n {
            case "true", "True": return .literal(.bool(true))
            case "false", "False": return .literal(.bool(false))
            case "none", "None": return .literal(.none)
            default: return .name(n)
            }
        case .op("("):
            if accept(")") { return .list([]) }
            let e = try expression()
            if accept(",") {
                var items = [e]
                while !accept(")") { items.append(try expression()); if !accept(",") { try expect(")"); break } }
                return .list(items)
            }
            try expect(")")
            return e
        case .op("["):
            var items: [Expr] = []
            while !accept("]") { items.append(try expression()); if !accept(",") { try expect("]"); break } }
            return .list(items)
        case .op("{"):
            var pairs: [(Expr, Expr)] = []
            while !accept("}") {
                let k = try expression()
                try expect(":")
                pairs.append((k, try expression()))
                if !accept(",") { try expect("}"); break }
            }
            return .dict(pairs)
        case let t: throw error("unexpected \(describe(t))")
        }
    }
}

// MARK: - Statements

struct TemplateParser {
    let segs: [Segment]
    var pos = 0

    init(_ source: String) throws { segs = try segments(source) }

    /// Checks that a closing tag (`endif`, ...) has nothing after its keyword.
    func close(_ tag: ExprParser?) throws {
        var t = tag
        try t?.atEnd()
    }

    /// Parses nodes until a statement whose keyword is in `until` (returned, not consumed past).
    mutating func parse(until: Set<String>) throws -> ([Node], String?, ExprParser?) {
        var nodes: [Node] = []
        while pos < segs.count {
            let seg = segs[pos]
            pos += 1
            switch seg.kind {
            case .text: nodes.append(.text(seg.body))
            case .output:
                var p = try ExprParser(seg.body, line: seg.line)
                let e = try p.tuple()
                try p.atEnd()
                nodes.append(.output(e, line: seg.line))
            case .statement:
                var p = try ExprParser(seg.body, line: seg.line)
                let keyword = try p.identifier()
                if until.contains(keyword) { return (nodes, keyword, p) }
                nodes.append(try statement(keyword, &p, line: seg.line))
            }
        }
        if !until.isEmpty {
            throw TemplateError(line: segs.last?.line ?? 0, message: "missing '\(until.sorted().joined(separator: "' or '"))' before the end of the template")
        }
        return (nodes, nil, nil)
    }

    mutating func statement(_ keyword: String, _ p: inout ExprParser, line: Int) throws -> Node {
        switch keyword {
        case "if":
            var branches: [(Expr, [Node])] = []
            var cond = try p.tuple()
            try p.atEnd()
            while true {
                let (body, end, next) = try parse(until: ["elif", "else", "endif"])
                branches.append((cond, body))
                guard var q = next else { throw p.error("unclosed if") }
                if end == "elif" { cond = try q.tuple(); try q.atEnd(); continue }
                if end == "else" {
                    try q.atEnd()
                    let (elseBody, _, r) = try parse(until: ["endif"])
                    try close(r)
                    return .ifs(branches, elseBody: elseBody, line: line)
                }
                try q.atEnd()
                return .ifs(branches, elseBody: [], line: line)
            }
        case "for":
            var targets = [try p.identifier()]
            while p.accept(",") { targets.append(try p.identifier()) }
            guard p.acceptName("in") else { throw p.error("expected 'in' in a for loop") }
            let iterable = try p.orExpr()
            var condition: Expr?
            if p.acceptName("if") { condition = try p.orExpr() }
            if p.acceptName("recursive") { throw p.error("recursive for loops are not supported") }
            try p.atEnd()
            let (body, end, q) = try parse(until: ["else", "endfor"])
            try close(q)
            var elseBody: [Node] = []
            if end == "else" {
                let (b, _, r) = try parse(until: ["endfor"])
                try close(r)
                elseBody = b
            }
            return .forLoop(targets: targets, iterable: iterable, condition: condition, body: body, elseBody: elseBody, line: line)
        case "set":
            let first = try p.identifier()
            if p.accept(".") {
                let attr = try p.identifier()
                try p.expect("=")
                let e = try p.tuple()
                try p.atEnd()
                return .set(.attribute(first, attr), e, line: line)
            }
            var names = [first]
            while p.accept(",") { names.append(try p.identifier()) }
            if p.peek == .end {
                guard names.count == 1 else { throw p.error("a block set takes one name") }
                let (body, _, q) = try parse(until: ["endset"])
                try close(q)
                return .setBlock(first, body, line: line)
            }
            try p.expect("=")
            let e = try p.tuple()
            try p.atEnd()
            return .set(.names(names), e, line: line)
        case "macro":
            let name = try p.identifier()
            try p.expect("(")
            var params: [(String, Expr?)] = []
            while !p.accept(")") {
                let n = try p.identifier()
                params.append((n, p.accept("=") ? try p.expression() : nil))
                if !p.accept(",") { try p.expect(")"); break }
            }
            try p.atEnd()
            let (body, _, q) = try parse(until: ["endmacro"])
            try close(q)
            return .macro(name, params, body, line: line)
        case "call":
            let e = try p.expression()
            try p.atEnd()
            let (body, _, q) = try parse(until: ["endcall"])
            try close(q)
            return .callBlock(e, body, line: line)
        case "filter":
            let name = try p.dottedName()
            let args = p.isOp("(") ? try p.callArguments().0 : []
            try p.atEnd()
            let (body, _, q) = try parse(until: ["endfilter"])
            try close(q)
            return .filterBlock(name, args, body, line: line)
        case "break": try p.atEnd(); return .breakLoop(line: line)
        case "continue": try p.atEnd(); return .continueLoop(line: line)
        case "generation":
            try p.atEnd()
            let (body, _, q) = try parse(until: ["endgeneration"])
            try close(q)
            return .block(body)
        default:
            throw p.error("unknown statement '\(keyword)'")
        }
    }
}
