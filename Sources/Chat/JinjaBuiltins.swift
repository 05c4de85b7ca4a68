// Filters, tests, and the methods of strings, lists and dicts that chat templates call, with
// Python's semantics (str.split without a separator splits on runs of whitespace, strip takes
// a set of characters, ...). `tojson` is Hugging Face's: json.dumps with ensure_ascii=False.
import Foundation

extension Renderer {
    func kw(_ kwargs: [(String, JValue)], _ name: String) -> JValue? { kwargs.first { $0.0 == name }?.1 }

    func applyFilter(_ name: String, _ v: JValue, _ args: [JValue], _ kwargs: [(String, JValue)], _ line: Int) throws -> JValue {
        func fail(_ m: String) -> TemplateError { TemplateError(line: line, message: "filter '\(name)': \(m)") }
        func arg(_ i: Int, _ key: String) -> JValue? { i < args.count ? args[i] : kw(kwargs, key) }
        switch name {
        case "tojson":
            var indent: Int?
            if case let .int(i)? = arg(0, "indent") { indent = i }
            var itemSep: String?, keySep: String?
            if case let .array(seps)? = arg(2, "separators"), seps.count == 2 { itemSep = seps[0].str; keySep = seps[1].str }
            let sortKeys = arg(3, "sort_keys")?.truthy ?? false
            let ascii = arg(1, "ensure_ascii")?.truthy ?? false
            do { return .string(try jsonDumps(v, indent: indent, itemSeparator: itemSep, keySeparator: keySep, sortKeys: sortKeys, ensureASCII: ascii)) }
            catch let e as TemplateError { throw TemplateError(line: line, message: e.message) }
        case "trim", "strip":
            if let chars = arg(0, "chars"), case let .string(c) = chars { return .string(pyStrip(v.str, c, left: true, right: true)) }
            return .string(v.str.trimmingCharacters(in: .whitespacesAndNewlines))
        case "length", "count":
            switch v {
            case let .string(s): return .int(s.count)
            case let .array(a): return .int(a.count)
            case let .dict(d): return .int(d.count)
            case .undefined: return .int(0)
            default: throw fail("object of type '\(v.typeName)' has no len()")
            }
        case "items":
            switch v {
            case let .dict(d): return .array(d.pairs.map { .array([.string($0.0), $0.1]) })
            case .undefined: return .array([])
            default: throw fail("expected a mapping, got '\(v.typeName)'")
            }
        case "list": return .array(try iterate(v, line))
        case "string": return .string(v.str)
        case "lower": return .string(v.str.lowercased())
        case "upper": return .string(v.str.uppercased())
        case "capitalize": return .string(pyCapitalize(v.str))
        case "title": return .string(v.str.capitalized)
        case "safe", "escape", "e": return v.isUndefined ? .string("") : (name == "safe" ? v : .string(htmlEscape(v.str)))
        case "join":
            let sep = arg(0, "d")?.str ?? ""
            var items = try iterate(v, line)
            if let attr = kw(kwargs, "attribute")?.str { items = try items.map { try attribute($0, attr, line, preferItem: true) } }
            return .string(items.map(\.str).joined(separator: sep))
        case "default", "d":
            let fallback = arg(0, "default_value") ?? .string("")
            let boolean = arg(1, "boolean")?.truthy ?? false
            return v.isUndefined || (boolean && !v.truthy) ? fallback : v
        case "first":
            let items = try iterate(v, line)
            return items.first ?? .undefined("first")
        case "last":
            let items = try iterate(v, line)
            return items.last ?? .undefined("last")
        case "reverse":
            if case let .string(s) = v { return .string(String(s.reversed())) }
            return .array(try iterate(v, line).reversed())
        case "unique":
            var out: [JValue] = []
            for x in try iterate(v, line) where !out.contains(where: { JValue.equal($0, x) }) { out.append(x) }
            return .array(out)
        case "sort":
            let reverse = arg(0, "reverse")?.truthy ?? false
            let attr = kw(kwargs, "attribute")?.str
            var items = try iterate(v, line)
            var failure: Error?
            items.sort { a, b in
                do {
                    let x = try attr.map { try attribute(a, $0, line, preferItem: true) } ?? a
                    let y = try attr.map { try attribute(b, $0, line, preferItem: true) } ?? b
                    let c = try compareValues(x, y, line)
                    return reverse ? c > 0 : c < 0
                } catch { failure = error; return false }
            }
            if let failure { throw failure }
            return .array(items)
        case "map":
            let items = try iterate(v, line)
            if let attr = kw(kwargs, "attribute")?.str {
                let def = kw(kwargs, "default")
                return .array(try items.map { item in
                    let x = try attribute(item, attr, line, preferItem: true)
                    return x.isUndefined ? (def ?? x) : x
                })
            }
            guard case let .string(f)? = args.first else { throw fail("give a filter name or attribute=") }
            return .array(try items.map { try applyFilter(f, $0, Array(args.dropFirst()), [], line) })
        case "select", "reject":
            let items = try iterate(v, line)
            return .array(try items.filter { item in
                let r: Bool
                if case let .string(t)? = args.first { r = try applyTest(t, item, Array(args.dropFirst()), line) } else { r = item.truthy }
                return name == "select" ? r : !r
            })
        case "selectattr", "rejectattr":
            guard case let .string(attr)? = args.first else { throw fail("give an attribute name") }
            let items = try iterate(v, line)
            return .array(try items.filter { item in
                let x = try attribute(item, attr, line, preferItem: true)
                let r: Bool
                if args.count > 1, case let .string(t) = args[1] { r = try applyTest(t, x, Array(args.dropFirst(2)), line) } else { r = x.truthy }
                return name == "selectattr" ? r : !r
            })
        case "int":
            switch v {
            case let .int(i): return .int(i)
            case let .double(d): return .int(Int(d))
            case let .bool(b): return .int(b ? 1 : 0)
            case let .string(s): return .int(Int(s.trimmingCharacters(in: .whitespaces)) ?? (arg(0, "default").flatMap { if case let .int(i) = $0 { return i }; return nil } ?? 0))
            default: return .int(0)
            }
        case "float":
            if let n = v.number { return .double(n) }
            if case let .string(s) = v, let d = Double(s.trimmingCharacters(in: .whitespaces)) { return .double(d) }
            return .double(0)
        case "abs":
            if case let .int(i) = v { return .int(abs(i)) }
            guard let n = v.number else { throw fail("bad operand") }
            return .double(abs(n))
        case "round":
            guard let n = v.number else { throw fail("bad operand") }
            var precision = 0
            if case let .int(p)? = arg(0, "precision") { precision = p }
            let f = pow(10.0, Double(precision))
            return .double((n * f).rounded(.toNearestOrEven) / f)
        case "sum":
            var total: JValue = .int(0)
            for x in try iterate(v, line) { total = try binary("+", total, x, line) }
            return total
        case "replace":
            guard args.count >= 2 else { throw fail("takes old and new") }
            return .string(v.str.replacingOccurrences(of: args[0].str, with: args[1].str))
        case "indent":
            var width = 4
            if case let .int(w)? = arg(0, "width") { width = w }
            let first = arg(1, "first")?.truthy ?? false
            let pad = String(repeating: " ", count: width)
            let lines = v.str.components(separatedBy: "\n")
            return .string(lines.enumerated().map { i, l in (i == 0 && !first) || l.isEmpty ? l : pad + l }.joined(separator: "\n"))
        case "wordcount": return .int(v.str.split(whereSeparator: { $0.isWhitespace }).count)
        case "batch":
            guard case let .int(n)? = args.first, n > 0 else { throw fail("takes a positive size") }
            let items = try iterate(v, line)
            return .array(stride(from: 0, to: items.count, by: n).map { .array(Array(items[$0..<min(items.count, $0 + n)])) })
        case "dictsort":
            guard case let .dict(d) = v else { throw fail("expected a mapping") }
            return .array(d.pairs.sorted { $0.0 < $1.0 }.map { .array([.string($0.0), $0.1]) })
        case "attr":
            return try attribute(v, args.first?.str ?? "", line, preferItem: false)
        default:
            throw TemplateError(line: line, message: "unknown filter '\(name)'")
        }
    }

    func applyTest(_ name: String, _ v: JValue, _ args: [JValue], _ line: Int) throws -> Bool {
        switch name {
        case "defined": return !v.isUndefined
        case "undefined": return v.isUndefined
        case "none": if case .none = v { return true }; return false
        case "string": if case .string = v { return true }; return false
        case "number": switch v { case .int, .double: return true; default: return false }
        case "integer": if case .int = v { return true }; return false
        case "float": if case .double = v { return true }; return false
        case "boolean": if case .bool = v { return true }; return false
        case "true": if case .bool(true) = v { return true }; return false
        case "false": if case .bool(false) = v { return true }; return false
        case "mapping": switch v { case .dict, .namespace: return true; default: return false }
        case "iterable": switch v { case .array, .dict, .string, .namespace: return true; default: return false }
        case "sequence": switch v { case .array, .dict, .string: return true; default: return false }
        case "callable": if case .function = v { return true }; return false
        case "odd", "even":
            guard case let .int(i) = v else { throw TemplateError(line: line, message: "test '\(name)' needs an integer") }
            return (i % 2 != 0) == (name == "odd")
        case "divisibleby":
            guard case let .int(i) = v, case let .int(d)? = args.first, d != 0 else { throw TemplateError(line: line, message: "divisibleby needs integers") }
            return i % d == 0
        case "equalto", "eq", "==", "sameas": return JValue.equal(v, args.first ?? .none)
        case "ne", "!=": return !JValue.equal(v, args.first ?? .none)
        case "lt", "<": return try compareValues(v, args.first ?? .none, line) < 0
        case "le", "<=": return try compareValues(v, args.first ?? .none, line) <= 0
        case "gt", ">", "greaterthan": return try compareValues(v, args.first ?? .none, line) > 0
        case "ge", ">=": return try compareValues(v, args.first ?? .none, line) >= 0
        case "in": return try binary("in", v, args.first ?? .none, line).truthy
        case "lower": return v.str == v.str.lowercased()
        case "upper": return v.str == v.str.uppercased()
        default: throw TemplateError(line: line, message: "unknown test '\(name)'")
        }
    }

    /// A bound method of `v` named `name`, or nil when the type has none.
    func method(_ v: JValue, _ name: String, _ line: Int) throws -> JValue? {
        func m(_ body: @escaping ([JValue], [(String, JValue)]) throws -> JValue) -> JValue {
            .function(JFunction(name) { a, k in
                do { return try body(a, k) } catch let e as TemplateError { throw TemplateError(line: line, message: e.message, raised: e.raised) }
            })
        }
        func str(_ a: [JValue], _ i: Int) -> String? { if i < a.count, case let .string(s) = a[i] { return s }; return nil }
        switch v {
        case let .string(s):
            switch name {
            case "strip", "lstrip", "rstrip":
                return m { a, _ in
                    if let chars = str(a, 0) { return .string(pyStrip(s, chars, left: name != "rstrip", right: name != "lstrip")) }
                    return .string(pyStrip(s, nil, left: name != "rstrip", right: name != "lstrip"))
                }
            case "split", "rsplit":
                return m { a, k in
                    var maxsplit = -1
                    if a.count > 1, case let .int(n) = a[1] { maxsplit = n } else if case let .int(n)? = self.kw(k, "maxsplit") { maxsplit = n }
                    let sep = str(a, 0) ?? self.kw(k, "sep").flatMap { if case let .string(x) = $0 { return x }; return nil }
                    return .array(pySplit(s, sep, maxsplit, fromRight: name == "rsplit").map { .string($0) })
                }
            case "splitlines":
                return m { _, _ in
                    var lines = s.components(separatedBy: .newlines)
                    if lines.last == "" { lines.removeLast() }   // no empty line after a final newline
                    return .array(lines.map { .string($0) })
                }
            case "startswith", "endswith":
                return m { a, _ in
                    let options: [String]
                    switch a.first { case let .string(x)?: options = [x]; case let .array(xs)?: options = xs.map(\.str); default: options = [] }
                    return .bool(options.contains { name == "startswith" ? s.hasPrefix($0) : s.hasSuffix($0) })
                }
            case "upper": return m { _, _ in .string(s.uppercased()) }
            case "lower": return m { _, _ in .string(s.lowercased()) }
            case "title": return m { _, _ in .string(s.capitalized) }
            case "capitalize": return m { _, _ in .string(pyCapitalize(s)) }
            case "replace":
                return m { a, _ in
                    guard let old = str(a, 0), let new = str(a, 1) else { throw TemplateError(line: line, message: "replace takes two strings") }
                    if a.count > 2, case let .int(n) = a[2], n >= 0 {
                        var out = s, done = 0, from = out.startIndex
                        while done < n, let r = out.range(of: old, range: from..<out.endIndex) {
                            out.replaceSubrange(r, with: new); from = out.index(r.lowerBound, offsetBy: new.count); done += 1
                        }
                        return .string(out)
                    }
                    return .string(old.isEmpty ? s : s.replacingOccurrences(of: old, with: new))
                }
            case "find", "rfind", "index":
                return m { a, _ in
                    guard let sub = str(a, 0) else { throw TemplateError(line: line, message: "\(name) takes a string") }
                    guard let r = name == "rfind" ? s.range(of: sub, options: .backwards) : s.range(of: sub) else {
                        if name == "index" { throw TemplateError(line: line, message: "substring not found") }
                        return .int(-1)
                    }
                    return .int(s.distance(from: s.startIndex, to: r.lowerBound))
                }
            case "count": return m { a, _ in .int(str(a, 0).map { $0.isEmpty ? s.count + 1 : s.components(separatedBy: $0).count - 1 } ?? 0) }
            case "join": return m { a, _ in .string(try self.iterate(a.first ?? .array([]), line).map(\.str).joined(separator: s)) }
            case "isdigit": return m { _, _ in .bool(!s.isEmpty && s.allSatisfy { $0.isNumber }) }
            case "isalpha": return m { _, _ in .bool(!s.isEmpty && s.allSatisfy { $0.isLetter }) }
            case "isspace": return m { _, _ in .bool(!s.isEmpty && s.allSatisfy { $0.isWhitespace }) }
            case "removeprefix": return m { a, _ in let p = str(a, 0) ?? ""; return .string(s.hasPrefix(p) ? String(s.dropFirst(p.count)) : s) }
            case "removesuffix": return m { a, _ in let p = str(a, 0) ?? ""; return .string(s.hasSuffix(p) && !p.isEmpty ? String(s.dropLast(p.count)) : s) }
            default: return nil
            }
        case let .dict(d):
            switch name {
            case "items": return m { _, _ in .array(d.pairs.map { .array([.string($0.0), $0.1]) }) }
            case "keys": return m { _, _ in .array(d.keys.map { .string($0) }) }
            case "values": return m { _, _ in .array(d.pairs.map { $0.1 }) }
            case "get": return m { a, _ in (str(a, 0).flatMap { d[$0] }) ?? (a.count > 1 ? a[1] : .none) }
            default: return nil
            }
        case .array:
            return nil   // the sandbox Hugging Face uses forbids mutating lists (append, pop)
        default:
            return nil
        }
    }
}

func pyStrip(_ s: String, _ chars: String?, left: Bool, right: Bool) -> String {
    let set: (Character) -> Bool = chars.map { c in { c.contains($0) } } ?? { $0.isWhitespace }
    var sub = Substring(s)
    if left { while let f = sub.first, set(f) { sub.removeFirst() } }
    if right { while let l = sub.last, set(l) { sub.removeLast() } }
    return String(sub)
}

func pySplit(_ s: String, _ sep: String?, _ maxsplit: Int, fromRight: Bool) -> [String] {
    guard let sep else {
        // Runs of whitespace; leading and trailing whitespace give no empty parts.
        var parts = s.split(whereSeparator: { $0.isWhitespace }).map(String.init)
        if maxsplit >= 0 && parts.count > maxsplit + 1 {
            if fromRight {
                // Rare in templates: keep Python's result for the common no-limit case only.
                let head = parts.dropLast(maxsplit).joined(separator: " ")
                parts = [head] + parts.suffix(maxsplit)
            } else {
                var rest = Substring(s).drop(while: { $0.isWhitespace })
                var out: [String] = []
                for _ in 0..<maxsplit {
                    guard let end = rest.firstIndex(where: { $0.isWhitespace }) else { break }
                    out.append(String(rest[..<end]))
                    rest = rest[end...].drop(while: { $0.isWhitespace })
                }
                if !rest.isEmpty { out.append(String(rest)) }
                parts = out
            }
        }
        return parts
    }
    var parts = s.components(separatedBy: sep)
    if maxsplit >= 0 && parts.count > maxsplit + 1 {
        if fromRight {
            let head = parts[0..<(parts.count - maxsplit)].joined(separator: sep)
            parts = [head] + parts.suffix(maxsplit)
        } else {
            let tail = parts[maxsplit...].joined(separator: sep)
            parts = Array(parts[0..<maxsplit]) + [tail]
        }
    }
    return parts
}

func pyCapitalize(_ s: String) -> String {
    guard let f = s.first else { return s }
    return String(f).uppercased() + s.dropFirst().lowercased()
}

func htmlEscape(_ s: String) -> String {
    s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
        .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&#34;")
        .replacingOccurrences(of: "'", with: "&#39;")
}
