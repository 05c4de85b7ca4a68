// tokenizer.json `post_processor`, applied when special tokens are requested: TemplateProcessing
// (Llama 3's `<|begin_of_text|> $A`), ByteLevel (no change to ids), BertProcessing,
// RobertaProcessing, and Sequence of those.

indirect enum PostProcessor: Sendable {
    case template(before: [Int32], after: [Int32])
    case none
    case sequence([PostProcessor])

    init(json: [String: Any]) throws {
        let type = json["type"] as? String ?? "(no type)"
        switch type {
        case "ByteLevel":
            self = .none
        case "TemplateProcessing":
            guard let single = json["single"] as? [[String: Any]] else {
                throw TokenizerError.unsupported(component: "post_processor.TemplateProcessing", hint: "needs a 'single' template")
            }
            let specials = json["special_tokens"] as? [String: Any] ?? [:]
            var before: [Int32] = [], after: [Int32] = [], seenSequence = false
            for item in single {
                if let seq = item["Sequence"] as? [String: Any] {
                    guard seq["id"] as? String == "A", !seenSequence else {
                        throw TokenizerError.unsupported(component: "post_processor.TemplateProcessing single", hint: "one $A sequence")
                    }
                    seenSequence = true
                } else if let sp = item["SpecialToken"] as? [String: Any], let name = sp["id"] as? String {
                    guard let entry = specials[name] as? [String: Any], let ids = entry["ids"] as? [Int] else {
                        throw TokenizerError.unsupported(component: "post_processor.TemplateProcessing token \(name)",
                                                         hint: "missing from special_tokens")
                    }
                    guard ids.allSatisfy({ $0 >= 0 && $0 < 1 << 24 }) else {
                        throw TokenizerError.unsupported(component: "post_processor.TemplateProcessing", hint: "special token ids must be in 0..<\(1 << 24)")
                    }
                    if seenSequence { after += ids.map(Int32.init) } else { before += ids.map(Int32.init) }
                }
            }
            self = .template(before: before, after: after)
        case "BertProcessing", "RobertaProcessing":
            guard let cls = json["cls"] as? [Any], cls.count == 2, let clsId = cls[1] as? Int,
                  let sep = json["sep"] as? [Any], sep.count == 2, let sepId = sep[1] as? Int,
                  (0..<(1 << 24)).contains(clsId), (0..<(1 << 24)).contains(sepId) else {
                throw TokenizerError.unsupported(component: "post_processor.\(type)", hint: "needs cls and sep")
            }
            self = .template(before: [Int32(clsId)], after: [Int32(sepId)])
        case "Sequence":
            let list = json["processors"] as? [[String: Any]] ?? []
            self = .sequence(try list.map { try PostProcessor(json: $0) })
        default:
            throw TokenizerError.unsupported(component: "post_processor.\(type)",
                hint: "supported: TemplateProcessing, ByteLevel, BertProcessing, RobertaProcessing, Sequence")
        }
    }

    func apply(_ ids: [Int32]) -> [Int32] {
        switch self {
        case .none: ids
        case let .template(before, after): before + ids + after
        case let .sequence(list): list.reduce(ids) { $1.apply($0) }
        }
    }
}
