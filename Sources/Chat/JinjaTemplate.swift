// Rendering a parsed template: scopes as Jinja keeps them (a for loop's body and a macro call
// have their own; `if` does not), the `loop` object, macros, namespaces, the globals Hugging Face
// provides (raise_exception, strftime_now, range, namespace, dict), filters, tests and the
// Python string, list and dict methods templates call. Output size, work and recursion are
// bounded so a runaway template fails instead of hanging or eating memory.
import Foundation

public struct JinjaTemplate {
    let nodes: [Node]

    /// Limits: characters of output, evaluation steps, macro call depth.
    public var maxOutput = 4 << 20
    public var maxSteps = 5_000_000
    public var maxDepth = 64

    public init(_ source: String) throws {
        var p = try TemplateParser(source)
        nodes = try p.parse(until: []).0
    }

    /// Renders with `context` as the template's variables; `now` fixes strftime_now's clock.
    public func render(_ context: [String: JValue], now: Date? = nil) throws -> String {
        let r = Renderer(template: self)
        r.scopes = [Renderer.globals(now: now), context]
        try r.run(nodes)
        return r.out
    }
}

private enum Flow: Error { case breakLoop, continueLoop }

final class Renderer {
    let template: JinjaTemplate
    var scopes: [[String: JValue]] = []
    var out = ""
    var steps = 0
    var depth = 0

    init(template: JinjaTemplate) { self.template = template }

    static func globals(now: Date?) -> [String: JValue] {
        var g: [String: JValue] = [:]
        g["raise_exception"] = .function(JFunction("raise_exception") { a, _ in
            throw TemplateError(line: 0, message: a.first?.str ?? "raise_exception called", raised: true)
        })
        g["strftime_now"] = .function(JFunction("strftime_now") { a, _ in
            guard case let .string(f)? = a.first else { throw TemplateError(line: 0, message: "strftime_now takes a format string") }
            var t = now.map { time_t($0.timeIntervalSince1970) } ?? time(nil)
            var tmv = tm()
            localtime_r(&t, &tmv)
            var buf = [Int8](repeating: 0, count: 256)
            let n = strftime(&buf, buf.count, f, &tmv)
            return .string(String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self))
        })
        g["range"] = .function(JFunction("range") { a, _ in
            let ints = try a.map { v -> Int in guard case let .int(i) = v else { throw TemplateError(line: 0, message: "range takes integers") }; return i }
            let (lo, hi, step) = ints.count == 1 ? (0, ints[0], 1) : ints.count == 2 ? (ints[0], ints[1], 1)
                : ints.count == 3 ? (ints[0], ints[1], ints[2]) : (0, 0, 0)
            guard step != 0 else { throw TemplateError(line: 0, message: "range: bad arguments") }
            guard abs((hi - lo) / step) <= 1_000_000 else { throw TemplateError(line: 0, message: "range is too long") }
            return .array(Array(stride(from: lo, to: hi, by: step)).map { .int($0) })
        })
        g["namespace"] = .function(JFunction("namespace") { a, kw in
            var d = JDict()
            if case let .dict(initial)? = a.first { d = initial }
            for (k, v) in kw { d[k] = v }
            return .namespace(JNamespace(d))
        })
        g["dict"] = .function(JFunction("dict") { a, kw in
            var d = JDict()
            if case let .dict(initial)? = a.first { d = initial }
            for (k, v) in kw { d[k] = v }
            return .dict(d)
        })
        return g
    }

    // MARK: Scopes

    func lookup(_ name: String) -> JValue {
        for s in scopes.reversed() { if let v = s[name] { return v } }
        return .undefined(name)
    }
    func assign(_ name: String, _ v: JValue) { scopes[scopes.count - 1][name] = v }

    func tick(_ line: Int) throws {
        steps += 1
        if steps > template.maxSteps {
            throw TemplateError(line: line, message: "the template took more than \(template.maxSteps) steps (a runaway loop?)")
        }
    }

    func emit(_ s: String, line: Int) throws {
        out += s
        if out.utf8.count > template.maxOutput {
            throw TemplateError(line: line, message: "the output grew beyond \(template.maxOutput) bytes")
        }
    }

    // MARK: Statements

    func run(_ nodes: [Node]) throws {
        for n in nodes { try run(n) }
    }

    func run(_ node: Node) throws {
        switch node {
        case let .text(t): try emit(t, line: 0)
        case let .output(e, line):
            try tick(line)
            let v = try eval(e, line)
            try emit(v.str, line: line)
        case let .ifs(branches, elseBody, line):
            try tick(line)
            for (cond, body) in branches where try eval(cond, line).truthy { return try run(body) }
            try run(elseBody)
        case let .forLoop(targets, iterable, condition, body, elseBody, line):
            try tick(line)
            var items = try iterate(try eval(iterable, line), line)
            if let condition {
                items = try items.filter { item in
                    scopes.append([:]); defer { scopes.removeLast() }
                    try bind(targets, item, line)
                    return try eval(condition, line).truthy
                }
            }
            if items.isEmpty { return try run(elseBody) }
            let n = items.count
            for (i, item) in items.enumerated() {
                try tick(line)
                var loop = JDict()
                loop["index"] = .int(i + 1); loop["index0"] = .int(i)
                loop["revindex"] = .int(n - i); loop["revindex0"] = .int(n - i - 1)
                loop["first"] = .bool(i == 0); loop["last"] = .bool(i == n - 1); loop["length"] = .int(n)
                loop["previtem"] = i > 0 ? items[i - 1] : .undefined("loop.previtem")
                loop["nextitem"] = i + 1 < n ? items[i + 1] : .undefined("loop.nextitem")
                loop["cycle"] = .function(JFunction("loop.cycle") { a, _ in a.isEmpty ? .none : a[i % a.count] })
                scopes.append(["loop": .dict(loop)])
                defer { scopes.removeLast() }
                try bind(targets, item, line)
                do { try run(body) } catch Flow.breakLoop { break } catch Flow.continueLoop { continue }
            }
        case let .set(target, e, line):
            try tick(line)
            let v = try eval(e, line)
            switch target {
            case let .names(names):
                try bind(names, v, line)
            case let .attribute(name, attr):
                guard case let .namespace(ns) = lookup(name) else {
                    throw TemplateError(line: line, message: "cannot assign attribute on '\(name)': not a namespace")
                }
                ns.values[attr] = v
            }
        case let .setBlock(name, body, _):
            assign(name, .string(try capture(body)))
        case let .macro(name, params, body, line):
            assign(name, .function(JFunction(name) { [unowned self] args, kwargs in
                guard self.depth < self.template.maxDepth else {
                    throw TemplateError(line: line, message: "macro '\(name)' recursed deeper than \(self.template.maxDepth)")
                }
                var frame: [String: JValue] = [:]
                for (i, (p, def)) in params.enumerated() {
                    if let kw = kwargs.first(where: { $0.0 == p }) { frame[p] = kw.1 }
                    else if i < args.count { frame[p] = args[i] }
                    else if let def { frame[p] = try self.eval(def, line) }
                    else { frame[p] = .undefined(p) }
                }
                frame["varargs"] = .array(Array(args.dropFirst(params.count)))
                // A macro sees the globals and the template's top-level names (itself included),
                // not the caller's loop variables.
                let saved = self.scopes
                self.scopes = Array(saved.prefix(2)) + [frame]
                self.depth += 1
                defer { self.depth -= 1; self.scopes = saved }
                return .string(try self.capture(body))
            }))
        case let .callBlock(e, _, line):
            _ = e
            throw TemplateError(line: line, message: "{% call %} blocks are not supported")
        case let .filterBlock(name, args, body, line):
            let text = try capture(body)
            try emit(try applyFilter(name, .string(text), try args.map { try eval($0, line) }, [], line).str, line: line)
        case .breakLoop: throw Flow.breakLoop
        case .continueLoop: throw Flow.continueLoop
        case let .block(body): try run(body)
        }
    }

    /// The output of `body`, apart from the template's own output.
    func capture(_ body: [Node]) throws -> String {
        let saved = out
        out = ""
        defer { out = saved }
        try run(body)
        return out
    }

    func bind(_ targets: [String], _ item: JValue, _ line: Int) throws {
        if targets.count == 1 { return assign(targets[0], item) }
        let parts = try iterate(item, line)
        guard parts.count == targets.count else {
            throw TemplateError(line: line, message: "cannot unpack \(parts.count) values into \(targets.count) names")
        }
        for (t, v) in zip(targets, parts) { assign(t, v) }
    }

    func iterate(_ v: JValue, _ line: Int) throws -> [JValue] {
        switch v {
        case let .array(a): return a
        case let .dict(d): return d.keys.map { .string($0) }
        case let .string(s): return s.map { .string(String($0)) }
        case .undefined: return []
        case .none: throw TemplateError(line: line, message: "'NoneType' object is not iterable")
        case let .namespace(n): return n.values.keys.map { .string($0) }
        default: throw TemplateError(line: line, message: "'\(v.typeName)' object is not iterable")
        }
    }

    // MARK: Expressions

    func eval(_ e: Expr, _ line: Int) throws -> JValue {
        switch e {
        case let .literal(v): return v
        case let .name(n): return lookup(n)
        case let .attr(base, name):
            let b = try eval(base, line)
            if case let .undefined(what) = b { throw TemplateError(line: line, message: "'\(what)' is undefined (reading .\(name))") }
            return try attribute(b, name, line, preferItem: false)
        case let .item(base, index):
            let b = try eval(base, line), i = try eval(index, line)
            if case let .undefined(what) = b { throw TemplateError(line: line, message: "'\(what)' is undefined (reading [\(i.repr)])") }
            return try subscriptValue(b, i, line)
        case let .slice(base, lo, hi, step):
            return try slice(try eval(base, line), try lo.map { try eval($0, line) }, try hi.map { try eval($0, line) },
                             try step.map { try eval($0, line) }, line)
        case let .call(fn, args, kwargs):
            let f = try eval(fn, line)
            let a = try args.map { try eval($0, line) }, k = try kwargs.map { ($0.0, try eval($0.1, line)) }
            guard case let .function(function) = f else {
                if case let .undefined(what) = f { throw TemplateError(line: line, message: "'\(what)' is undefined (called)") }
                throw TemplateError(line: line, message: "'\(f.typeName)' object is not callable")
            }
            do { return try function.body(a, k) } catch var err as TemplateError {
                if err.line == 0 { err = TemplateError(line: line, message: err.message, raised: err.raised) }
                throw err
            }
        case let .filter(base, name, args, kwargs):
            let v = try eval(base, line)
            return try applyFilter(name, v, try args.map { try eval($0, line) }, try kwargs.map { ($0.0, try eval($0.1, line)) }, line)
        case let .test(base, name, args, negated):
            let r = try applyTest(name, try evalForTest(base, line), try args.map { try eval($0, line) }, line)
            return .bool(negated ? !r : r)
        case let .unary(op, x):
            let v = try eval(x, line)
            switch (op, v) {
            case let ("-", .int(i)): return .int(-i)
            case let ("-", .double(d)): return .double(-d)
            case ("+", .int), ("+", .double): return v
            default: throw TemplateError(line: line, message: "bad operand type for unary \(op): '\(v.typeName)'")
            }
        case let .binary(op, l, r): return try binary(op, try eval(l, line), try eval(r, line), line)
        case let .and(l, r):
            let a = try eval(l, line)
            return a.truthy ? try eval(r, line) : a
        case let .or(l, r):
            let a = try eval(l, line)
            return a.truthy ? a : try eval(r, line)
        case let .not(x): return .bool(!(try eval(x, line)).truthy)
        case let .conditional(cond, value, other):
            return try eval(cond, line).truthy ? try eval(value, line) : try other.map { try eval($0, line) } ?? .undefined("else")
        case let .list(items): return .array(try items.map { try eval($0, line) })
        case let .dict(pairs):
            var d = JDict()
            for (k, v) in pairs {
                guard case let .string(key) = try eval(k, line) else { throw TemplateError(line: line, message: "dict keys must be strings") }
                d[key] = try eval(v, line)
            }
            return .dict(d)
        }
    }

    /// Tests see a missing attribute of an undefined value as undefined (`x.y is defined`).
    func evalForTest(_ e: Expr, _ line: Int) throws -> JValue {
        switch e {
        case let .attr(base, name):
            let b = try evalForTest(base, line)
            if case .undefined = b { return .undefined(name) }
            return try attribute(b, name, line, preferItem: false)
        case let .item(base, index):
            let b = try evalForTest(base, line)
            if case .undefined = b { return b }
            return try subscriptValue(b, try eval(index, line), line)
        default: return try eval(e, line)
        }
    }

    func attribute(_ b: JValue, _ name: String, _ line: Int, preferItem: Bool) throws -> JValue {
        switch b {
        case let .dict(d):
            if let m = try method(b, name, line) { if !preferItem || d[name] == nil { return m } }
            return d[name] ?? .undefined(name)
        case let .namespace(n): return n.values[name] ?? .undefined(name)
        default: return try method(b, name, line) ?? .undefined(name)
        }
    }

    func subscriptValue(_ b: JValue, _ i: JValue, _ line: Int) throws -> JValue {
        switch (b, i) {
        case let (.array(a), .int(k)):
            let idx = k < 0 ? a.count + k : k
            guard idx >= 0 && idx < a.count else { return .undefined("[\(k)]") }
            return a[idx]
        case let (.string(s), .int(k)):
            let chars = Array(s)
            let idx = k < 0 ? chars.count + k : k
            guard idx >= 0 && idx < chars.count else { return .undefined("[\(k)]") }
            return .string(String(chars[idx]))
        case let (.dict(d), .string(k)):
            if let v = d[k] { return v }
            return try method(b, k, line) ?? .undefined(k)
        case let (.namespace(n), .string(k)): return n.values[k] ?? .undefined(k)
        case let (_, .string(k)): return try attribute(b, k, line, preferItem: true)
        default: return .undefined("[\(i.repr)]")
        }
    }

    func slice(_ v: JValue, _ lo: JValue?, _ hi: JValue?, _ step: JValue?, _ line: Int) throws -> JValue {
        func int(_ x: JValue?) throws -> Int? {
            switch x { case nil, .none?: return nil; case let .int(i)?: return i
            default: throw TemplateError(line: line, message: "slice indices must be integers") }
        }
        let st = try int(step) ?? 1
        guard st != 0 else { throw TemplateError(line: line, message: "slice step cannot be zero") }
        func indices(_ n: Int) throws -> [Int] {
            func clamp(_ x: Int?, _ def: Int) -> Int {
                guard var x else { return def }
                if x < 0 { x += n }
                return st > 0 ? min(max(x, 0), n) : min(max(x, -1), n - 1)
            }
            let a = clamp(try int(lo), st > 0 ? 0 : n - 1), b = clamp(try int(hi), st > 0 ? n : -1)
            return Array(stride(from: a, to: b, by: st))
        }
        switch v {
        case let .array(a): return .array(try indices(a.count).map { a[$0] })
        case let .string(s):
            let chars = Array(s)
            return .string(String(try indices(chars.count).map { chars[$0] }))
        default: throw TemplateError(line: line, message: "'\(v.typeName)' object cannot be sliced")
        }
    }

    func compareValues(_ a: JValue, _ b: JValue, _ line: Int) throws -> Int {
        if let x = a.number, let y = b.number { return x < y ? -1 : x > y ? 1 : 0 }
        if case let .string(x) = a, case let .string(y) = b {
            return x == y ? 0 : x.unicodeScalars.lexicographicallyPrecedes(y.unicodeScalars) ? -1 : 1
        }
        throw TemplateError(line: line, message: "'<' not supported between '\(a.typeName)' and '\(b.typeName)'")
    }

    func binary(_ op: String, _ a: JValue, _ b: JValue, _ line: Int) throws -> JValue {
        switch op {
        case "==": return .bool(JValue.equal(a, b))
        case "!=": return .bool(!JValue.equal(a, b))
        case "<": return .bool(try compareValues(a, b, line) < 0)
        case ">": return .bool(try compareValues(a, b, line) > 0)
        case "<=": return .bool(try compareValues(a, b, line) <= 0)
        case ">=": return .bool(try compareValues(a, b, line) >= 0)
        case "in":
            switch b {
            case let .string(s):
                guard case let .string(x) = a else { throw TemplateError(line: line, message: "'in <string>' requires a string") }
                return .bool(x.isEmpty || s.contains(x))
            case let .array(arr): return .bool(arr.contains { JValue.equal($0, a) })
            case let .dict(d): if case let .string(k) = a { return .bool(d[k] != nil) }; return .bool(false)
            case .undefined: return .bool(false)
            default: throw TemplateError(line: line, message: "argument of type '\(b.typeName)' is not iterable")
            }
        case "~":
            let r = a.str + b.str
            guard r.utf8.count <= template.maxOutput else { throw TemplateError(line: line, message: "a string grew beyond \(template.maxOutput) bytes") }
            return .string(r)
        default: break
        }
        if a.isUndefined || b.isUndefined {
            let what: String = { if case let .undefined(n) = a { return n }; if case let .undefined(n) = b { return n }; return "" }()
            throw TemplateError(line: line, message: "'\(what)' is undefined (operand of \(op))")
        }
        switch (op, a, b) {
        case let ("+", .string(x), .string(y)):
            guard x.utf8.count + y.utf8.count <= template.maxOutput else { throw TemplateError(line: line, message: "a string grew beyond \(template.maxOutput) bytes") }
            return .string(x + y)
        case let ("+", .array(x), .array(y)):
            guard x.count + y.count <= 1_000_000 else { throw TemplateError(line: line, message: "a list grew beyond 1000000 items") }
            return .array(x + y)
        case let ("*", .string(x), .int(n)), let ("*", .int(n), .string(x)):
            guard n * x.utf8.count <= template.maxOutput else { throw TemplateError(line: line, message: "string repetition too large") }
            return .string(n > 0 ? String(repeating: x, count: n) : "")
        case let ("*", .array(x), .int(n)):
            guard n * x.count <= 1_000_000 else { throw TemplateError(line: line, message: "list repetition too large") }
            return .array(n > 0 ? Array([[JValue]](repeating: x, count: n).joined()) : [])
        default: break
        }
        guard let x = a.number, let y = b.number else {
            throw TemplateError(line: line, message: "unsupported operand types for \(op): '\(a.typeName)' and '\(b.typeName)'")
        }
        let ints: (Int, Int)? = {
            switch (a, b) {
            case let (.int(p), .int(q)): return (p, q)
            case let (.bool(p), .int(q)): return (p ? 1 : 0, q)
            case let (.int(p), .bool(q)): return (p, q ? 1 : 0)
            default: return nil
            }
        }()
        switch op {
        case "+": if let (p, q) = ints { return .int(p &+ q) }; return .double(x + y)
        case "-": if let (p, q) = ints { return .int(p &- q) }; return .double(x - y)
        case "*": if let (p, q) = ints { return .int(p &* q) }; return .double(x * y)
        case "/":
            guard y != 0 else { throw TemplateError(line: line, message: "division by zero") }
            return .double(x / y)
        case "//":
            guard y != 0 else { throw TemplateError(line: line, message: "integer division or modulo by zero") }
            if let (p, q) = ints { return .int(Int((Double(p) / Double(q)).rounded(.down))) }
            return .double((x / y).rounded(.down))
        case "%":
            guard y != 0 else { throw TemplateError(line: line, message: "integer division or modulo by zero") }
            if let (p, q) = ints { let r = p % q; return .int(r != 0 && (r < 0) != (q < 0) ? r + q : r) }
            let r = fmod(x, y); return .double(r != 0 && (r < 0) != (y < 0) ? r + y : r)
        case "**":
            if let (p, q) = ints, q >= 0 { var r = 1; for _ in 0..<min(q, 64) { r = r &* p }; return .int(r) }
            return .double(pow(x, y))
        default: throw TemplateError(line: line, message: "unknown operator \(op)")
        }
    }
}
