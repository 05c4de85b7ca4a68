// Errors from loading or using a tokenizer; each names the component or file at fault.

public enum TokenizerError: Error, CustomStringConvertible, Equatable {
    case cannotRead(path: String)
    case malformed(path: String, reason: String)
    /// A tokenizer.json component this implementation does not support, e.g.
    /// `pre_tokenizer.Split pattern "..."` or `model.type Unigram`.
    case unsupported(component: String, hint: String)
    case unknownToken(String)
    case tokenIdOutOfRange(Int, vocabSize: Int)

    public var description: String {
        switch self {
        case let .cannotRead(p): "cannot read \(p)"
        case let .malformed(p, r): "\(p) is malformed: \(r)"
        case let .unsupported(c, h): "unsupported tokenizer component \(c): \(h)"
        case let .unknownToken(t): "token '\(t)' is not in the vocabulary"
        case let .tokenIdOutOfRange(id, v): "token id \(id) is outside the vocabulary (0..<\(v))"
        }
    }
}
