// What a JSON value is, whichever reader produced it (FastJSON's Swift values, or Foundation's
// NSNumber and NSNull from config files and tests): the one place that tells numbers, booleans
// and null apart.
import Foundation

/// JSON null. A type check, not `is NSNull`: on Linux that cast bridges a Swift array or
/// dictionary to Foundation first, copying the whole value (a train_step body's token lists).
@inline(__always) public func isJSONNull(_ v: Any) -> Bool { type(of: v) == NSNull.self }

/// A JSON number as either reader gives it: FastJSON's Int or Double, or Foundation's NSNumber
/// (whose booleans are NSNumbers of ObjC type "c"). Booleans are not numbers.
public enum JSONNumber {
    case int(Int), double(Double)

    /// A JSON boolean: Swift's Bool, or Foundation's NSNumber of ObjC type "c".
    public static func isBool(_ v: Any) -> Bool {
        if type(of: v) == Bool.self { return true }
        return (v as? NSNumber).map { String(cString: $0.objCType) == "c" } ?? false
    }

    public static func classify(_ v: Any) -> JSONNumber? {
        let t = type(of: v)
        if t == Int.self { return .int(v as! Int) }
        if t == Double.self { return .double(v as! Double) }
        if t == Bool.self { return nil }
        guard let n = v as? NSNumber else { return nil }
        switch String(cString: n.objCType) {
        case "c": return nil
        case "d", "f": return .double(n.doubleValue)
        case "Q": return n.uint64Value <= UInt64(Int.max) ? .int(Int(n.uint64Value)) : .double(n.doubleValue)
        default: return .int(n.intValue)
        }
    }

    public var double: Double {
        switch self {
        case let .int(i): return Double(i)
        case let .double(d): return d
        }
    }

    /// The integer this number is exactly, if any (2.0 is 2; 2.5 and 1e300 are not).
    public var exactInt: Int? {
        switch self {
        case let .int(i): return i
        case let .double(d): return d.isFinite ? Int(exactly: d) : nil
        }
    }
}

