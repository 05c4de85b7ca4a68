// tokenizer.json `normalizer`: NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace (plain string)
// and Sequence of those. Anything else is refused by name.
import Foundation

indirect enum Normalizer: Sendable {
    case nfc, nfd, nfkc, nfkd, lowercase
    case prepend(String)
    case replace(String, String)
    case sequence([Normalizer])

    init(json: [String: Any]) throws {
        let type = json["type"] as? String ?? "(no type)"
        switch type {
        case "NFC": self = .nfc
        case "NFD": self = .nfd
        case "NFKC": self = .nfkc
        case "NFKD": self = .nfkd
        case "Lowercase": self = .lowercase
        case "Prepend":
            guard let p = json["prepend"] as? String else {
                throw TokenizerError.unsupported(component: "normalizer.Prepend", hint: "needs a 'prepend' string")
            }
            self = .prepend(p)
        case "Replace":
            guard let pattern = json["pattern"] as? [String: Any], let s = pattern["String"] as? String,
                  let content = json["content"] as? String else {
                throw TokenizerError.unsupported(component: "normalizer.Replace", hint: "only plain-string patterns are supported")
            }
            self = .replace(s, content)
        case "Sequence":
            let list = json["normalizers"] as? [[String: Any]] ?? []
            self = .sequence(try list.map { try Normalizer(json: $0) })
        default:
            throw TokenizerError.unsupported(component: "normalizer.\(type)",
                hint: "supported: NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace (string), Sequence")
        }
    }

    func apply(_ s: String) -> String {
        switch self {
        case .nfc: s.precomposedStringWithCanonicalMapping
        case .nfd: s.decomposedStringWithCanonicalMapping
        case .nfkc: s.precomposedStringWithCompatibilityMapping
        case .nfkd: s.decomposedStringWithCompatibilityMapping
        case .lowercase: s.lowercased()
        case let .prepend(p): s.isEmpty ? s : p + s
        case let .replace(a, b): s.replacingOccurrences(of: a, with: b)
        case let .sequence(list): list.reduce(s) { $1.apply($0) }
        }
    }
}
