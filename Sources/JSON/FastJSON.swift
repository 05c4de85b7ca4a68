// Ember's one JSON reader: request bodies (RPC and the OpenAI routes), and, keeping key order,
// the conversations and tool schemas chat templates print. ~20x Foundation's on Linux for the
// bodies Ember gets: a train_step upload is mostly long arrays of token ids and log-probabilities.
// Values come out as Swift types: [String: Any] (or OrderedObject when asked), String, Int,
// Double, Bool, NSNull, and arrays as [Int] when every element is an integer, [Double] when every
// element is a number, else [Any]. Integers beyond Int64 and numbers with a fraction or exponent
// are Doubles parsed by strtod, correctly rounded (Foundation's reader on Linux is not always).
// Strict RFC 8259: no trailing commas, comments, NaN or leading zeros; strings must be valid
// UTF-8 without raw control characters; unpaired surrogate escapes are refused, and so are
// numbers beyond a double's range. Nesting is bounded, so the reader never recurses without limit.
import Foundation

public enum FastJSON {
    public struct Failure: Error, CustomStringConvertible {
        public let offset: Int
        public let message: String
        public var description: String { "\(message) at byte \(offset)" }
    }

    /// An object with its keys in the order of the text (later duplicates follow the first).
    public final class OrderedObject {
        public let pairs: [(key: String, value: Any)]
        init(_ pairs: [(key: String, value: Any)]) { self.pairs = pairs }
    }

    /// Parses one JSON text (any value at the top, as `.fragmentsAllowed`); objects are
    /// OrderedObject with `orderedObjects`, else [String: Any].
    public static func parse(_ data: Data, maxDepth: Int = 64, orderedObjects: Bool = false) throws -> Any {
        try data.withUnsafeBytes { raw -> Any in
            guard let base = raw.baseAddress?.assumingMemoryBound(to: UInt8.self), raw.count > 0 else {
                throw Failure(offset: 0, message: "empty body")
            }
            var r = Reader(p: base, n: raw.count, maxDepth: maxDepth, ordered: orderedObjects)
            r.skipSpace()
            let v = try r.value(depth: 0)
            r.skipSpace()
            guard r.i == r.n else { throw r.fail("unexpected text after the value") }
            return v
        }
    }
}

private struct Reader {
    let p: UnsafePointer<UInt8>
    let n: Int
    let maxDepth: Int
    let ordered: Bool
    var i = 0

    init(p: UnsafePointer<UInt8>, n: Int, maxDepth: Int, ordered: Bool) {
        self.p = p; self.n = n; self.maxDepth = maxDepth; self.ordered = ordered
    }

    func fail(_ message: String) -> FastJSON.Failure { FastJSON.Failure(offset: i, message: message) }

    @inline(__always) mutating func skipSpace() {
        while i < n {
            let c = p[i]
            if c == 0x20 || c == 0x0A || c == 0x0D || c == 0x09 { i += 1 } else { return }
        }
    }

    @inline(__always) func peek() -> UInt8? { i < n ? p[i] : nil }

    mutating func value(depth: Int) throws -> Any {
        guard let c = peek() else { throw fail("unexpected end of the body") }
        switch c {
        case UInt8(ascii: "{"): return try object(depth: depth + 1)
        case UInt8(ascii: "["): return try array(depth: depth + 1)
        case UInt8(ascii: "\""): return try string()
        case UInt8(ascii: "t"): try literal("true"); return true
        case UInt8(ascii: "f"): try literal("false"); return false
        case UInt8(ascii: "n"): try literal("null"); return NSNull()
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            switch try number() {
            case let .int(v): return v
            case let .double(v): return v
            }
        default: throw fail("unexpected character '\(Character(Unicode.Scalar(c)))'")
        }
    }

    mutating func literal(_ word: StaticString) throws {
        let len = word.utf8CodeUnitCount
        guard i + len <= n, memcmp(p + i, word.utf8Start, len) == 0 else { throw fail("invalid literal") }
        i += len
    }

    mutating func object(depth: Int) throws -> Any {
        guard depth <= maxDepth else { throw fail("nesting deeper than \(maxDepth) levels") }
        i += 1
        var out: [String: Any] = [:]
        var pairs: [(key: String, value: Any)] = []
        func done() -> Any { ordered ? FastJSON.OrderedObject(pairs) : out }
        skipSpace()
        if peek() == UInt8(ascii: "}") { i += 1; return done() }
        while true {
            skipSpace()
            guard peek() == UInt8(ascii: "\"") else { throw fail("expected a string key") }
            let key = try string()
            skipSpace()
            guard peek() == UInt8(ascii: ":") else { throw fail("expected ':' after a key") }
            i += 1
            skipSpace()
            let v = try value(depth: depth)
            if ordered { pairs.append((key, v)) } else { out[key] = v }
            skipSpace()
            guard let c = peek() else { throw fail("unexpected end inside an object") }
            i += 1
            if c == UInt8(ascii: "}") { return done() }
            guard c == UInt8(ascii: ",") else { i -= 1; throw fail("expected ',' or '}'") }
        }
    }

    enum Number { case int(Int), double(Double) }

    mutating func array(depth: Int) throws -> Any {
        guard depth <= maxDepth else { throw fail("nesting deeper than \(maxDepth) levels") }
        let open = i
        i += 1
        skipSpace()
        if peek() == UInt8(ascii: "]") { i += 1; return [Any]() }
        // Homogeneous number arrays stay unboxed (not for ordered objects, whose readers print
        // values back): [Int] while every element is an integer, [Double] once one is not. An
        // element of another kind sends the array back to be read as [Any], so integers never
        // turn into doubles in a mixed array.
        if ordered { i = open; return try genericArray(depth: depth) }
        var ints: [Int] = [], doubles: [Double] = [], allInts = true
        while true {
            skipSpace()
            guard let c = peek(), c == UInt8(ascii: "-") || Self.digit(c) else { i = open; return try genericArray(depth: depth) }
            switch try number() {
            case let .int(x): if allInts { ints.append(x) } else { doubles.append(Double(x)) }
            case let .double(x):
                if allInts { doubles = ints.map(Double.init); ints = []; allInts = false }
                doubles.append(x)
            }
            skipSpace()
            guard let e = peek() else { throw fail("unexpected end inside an array") }
            i += 1
            if e == UInt8(ascii: "]") { return allInts ? ints as Any : doubles as Any }
            guard e == UInt8(ascii: ",") else { i -= 1; throw fail("expected ',' or ']'") }
        }
    }

    /// The array at `i` as [Any], each number as it is written (Int or Double).
    mutating func genericArray(depth: Int) throws -> Any {
        i += 1
        skipSpace()
        if peek() == UInt8(ascii: "]") { i += 1; return [Any]() }
        var anys: [Any] = []
        while true {
            skipSpace()
            anys.append(try value(depth: depth))
            skipSpace()
            guard let e = peek() else { throw fail("unexpected end inside an array") }
            i += 1
            if e == UInt8(ascii: "]") { return anys }
            guard e == UInt8(ascii: ",") else { i -= 1; throw fail("expected ',' or ']'") }
        }
    }

    @inline(__always) static func digit(_ c: UInt8) -> Bool { c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") }

    mutating func number() throws -> Number {
        let start = i
        var negative = false
        if p[i] == UInt8(ascii: "-") { negative = true; i += 1 }
        guard i < n, Self.digit(p[i]) else { throw fail("invalid number") }
        var mantissa: UInt64 = 0, digits = 0
        if p[i] == UInt8(ascii: "0") {
            i += 1
            if i < n, Self.digit(p[i]) { throw fail("a number may not have a leading zero") }
        } else {
            while i < n, Self.digit(p[i]) {
                if digits < 19 { mantissa = mantissa &* 10 &+ UInt64(p[i] - 48) }
                digits += 1
                i += 1
            }
        }
        var integral = true
        if i < n, p[i] == UInt8(ascii: ".") {
            integral = false
            i += 1
            guard i < n, Self.digit(p[i]) else { throw fail("a digit must follow the decimal point") }
            while i < n, Self.digit(p[i]) { i += 1 }
        }
        if i < n, p[i] == UInt8(ascii: "e") || p[i] == UInt8(ascii: "E") {
            integral = false
            i += 1
            if i < n, p[i] == UInt8(ascii: "+") || p[i] == UInt8(ascii: "-") { i += 1 }
            guard i < n, Self.digit(p[i]) else { throw fail("a digit must follow the exponent") }
            while i < n, Self.digit(p[i]) { i += 1 }
        }
        if integral && digits <= 18 {
            let v = Int(mantissa)
            return .int(negative ? -v : v)
        }
        if integral && digits == 19, mantissa <= UInt64(Int.max) || (negative && mantissa == UInt64(Int.max) + 1) {
            return .int(negative ? Int(truncatingIfNeeded: 0 &- mantissa) : Int(mantissa))
        }
        // strtod needs a terminated copy; numbers are short.
        let len = i - start
        guard len < 400 else { throw fail("a number of more than 400 characters") }
        let d = withUnsafeTemporaryAllocation(of: CChar.self, capacity: len + 1) { buf in
            for k in 0..<len { buf[k] = CChar(bitPattern: p[start + k]) }
            buf[len] = 0
            return strtod(buf.baseAddress!, nil)
        }
        guard d.isFinite else { i = start; throw fail("a number beyond the range of a double") }
        return .double(d)
    }

    mutating func string() throws -> String {
        i += 1
        let start = i
        // Fast path: no escapes.
        while i < n {
            let c = p[i]
            if c == UInt8(ascii: "\"") {
                let s = try Self.text(p + start, i - start, at: start)
                i += 1
                return s
            }
            if c == UInt8(ascii: "\\") { break }
            if c < 0x20 { throw fail("a raw control character inside a string (escape it)") }
            i += 1
        }
        var bytes = [UInt8](UnsafeBufferPointer(start: p + start, count: i - start))
        while i < n {
            let c = p[i]
            if c == UInt8(ascii: "\"") {
                i += 1
                return try Self.text(bytes, at: start)
            }
            if c < 0x20 { throw fail("a raw control character inside a string (escape it)") }
            if c != UInt8(ascii: "\\") { bytes.append(c); i += 1; continue }
            i += 1
            guard i < n else { break }
            let e = p[i]
            i += 1
            switch e {
            case UInt8(ascii: "\""): bytes.append(0x22)
            case UInt8(ascii: "\\"): bytes.append(0x5C)
            case UInt8(ascii: "/"): bytes.append(0x2F)
            case UInt8(ascii: "b"): bytes.append(0x08)
            case UInt8(ascii: "f"): bytes.append(0x0C)
            case UInt8(ascii: "n"): bytes.append(0x0A)
            case UInt8(ascii: "r"): bytes.append(0x0D)
            case UInt8(ascii: "t"): bytes.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = try hex4()
                if scalar >= 0xD800 && scalar < 0xDC00 {
                    guard i + 1 < n, p[i] == UInt8(ascii: "\\"), p[i + 1] == UInt8(ascii: "u") else {
                        throw fail("an unpaired surrogate in a \\u escape")
                    }
                    i += 2
                    let low = try hex4()
                    guard low >= 0xDC00 && low < 0xE000 else { throw fail("an unpaired surrogate in a \\u escape") }
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                } else if scalar >= 0xDC00 && scalar < 0xE000 {
                    throw fail("an unpaired surrogate in a \\u escape")
                }
                bytes.append(contentsOf: Array(String(Character(Unicode.Scalar(scalar)!)).utf8))
            default: throw fail("an invalid escape '\\\(Character(Unicode.Scalar(e)))'")
            }
        }
        throw fail("an unterminated string")
    }

    mutating func hex4() throws -> UInt32 {
        guard i + 4 <= n else { throw fail("a \\u escape needs four hex digits") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = p[i]
            let d: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = c - 48
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = c - 87
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = c - 55
            default: throw fail("a \\u escape needs four hex digits")
            }
            v = v << 4 | UInt32(d)
            i += 1
        }
        return v
    }

    static func text(_ start: UnsafePointer<UInt8>, _ count: Int, at offset: Int) throws -> String {
        try text(UnsafeBufferPointer(start: start, count: count), at: offset)
    }

    static func text<C: Collection>(_ bytes: C, at offset: Int) throws -> String where C.Element == UInt8 {
        guard let s = String(validating: bytes, as: UTF8.self) else {
            throw FastJSON.Failure(offset: offset, message: "a string that is not valid UTF-8")
        }
        return s
    }
}
