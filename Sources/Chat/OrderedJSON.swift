// JSON text to template values, keeping object key order (tool schemas are printed with
// `tojson`, and Python keeps the order the client sent). Integers stay integers. The text is
// read by FastJSON, Ember's one JSON reader.
import Foundation
import JSON

extension JValue {
    public static func parseJSON(_ data: Data) throws -> JValue {
        do {
            return fromReader(try FastJSON.parse(data, maxDepth: 512, orderedObjects: true))
        } catch let f as FastJSON.Failure {
            throw TemplateError(line: 0, message: "JSON at byte \(f.offset): \(f.message)")
        }
    }

    static func fromReader(_ v: Any) -> JValue {
        switch v {
        case let o as FastJSON.OrderedObject: return .dict(JDict(o.pairs.map { ($0.key, fromReader($0.value)) }))
        case let ints as [Int] where type(of: v) == [Int].self: return .array(ints.map { .int($0) })
        case let ds as [Double] where type(of: v) == [Double].self: return .array(ds.map { .double($0) })
        case let list as [Any]: return .array(list.map(fromReader))
        default: return fromJSON(v)
        }
    }
}
