// A Hugging Face tokenizer (tokenizer.json, byte-level BPE) with exact id parity with the Rust
// `tokenizers` library. Pipeline per text: added tokens split out of the raw text -> normalizer
// -> (added tokens marked `normalized`) -> pre-tokenizer -> BPE -> post-processor when special
// tokens are requested. Decoding maps tokens back to bytes and then to UTF-8.
import Foundation

public final class Tokenizer {
    let model: BPE
    let normalizer: Normalizer?
    let preTokenizer: PreTokenizer?
    let postProcessor: PostProcessor?
    let decoder: Decoder?
    let rawMatcher: AddedTokenMatcher
    let normalizedMatcher: AddedTokenMatcher
    let addedTokens: [Int32: AddedToken]
    let specialIds: Set<Int32>

    /// Largest id + 1 over the vocabulary and the added tokens.
    public let vocabSize: Int
    /// From tokenizer_config.json (`bos_token`, `eos_token`, `pad_token`) and
    /// generation_config.json (`*_token_id`, which wins: it is what generation uses).
    public let bosTokenId: Int32?
    public let eosTokenIds: [Int32]
    public let padTokenId: Int32?

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and
    /// `generation_config.json` from a model folder.
    public convenience init(directory: String) throws {
        let path = directory + "/tokenizer.json"
        guard let data = FileManager.default.contents(atPath: path) else { throw TokenizerError.cannotRead(path: path) }
        try self.init(tokenizerJSON: data, path: path,
                      config: FileManager.default.contents(atPath: directory + "/tokenizer_config.json"),
                      generationConfig: FileManager.default.contents(atPath: directory + "/generation_config.json"))
    }

    public init(tokenizerJSON data: Data, path: String = "tokenizer.json", config: Data? = nil,
                generationConfig: Data? = nil) throws {
        guard let json = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw TokenizerError.malformed(path: path, reason: "not a JSON object")
        }
        guard let modelJSON = json["model"] as? [String: Any] else {
            throw TokenizerError.malformed(path: path, reason: "no model")
        }
        let modelType = modelJSON["type"] as? String ?? "BPE"
        guard modelType == "BPE" else {
            throw TokenizerError.unsupported(component: "model.type \(modelType)", hint: "supported: BPE (byte-level)")
        }
        model = try BPE(json: modelJSON, path: path)
        normalizer = try (json["normalizer"] as? [String: Any]).map { try Normalizer(json: $0) }
        preTokenizer = try (json["pre_tokenizer"] as? [String: Any]).map { try PreTokenizer(json: $0) }
        postProcessor = try (json["post_processor"] as? [String: Any]).map { try PostProcessor(json: $0) }
        decoder = try (json["decoder"] as? [String: Any]).map { try Decoder(json: $0) }
        let added = try (json["added_tokens"] as? [[String: Any]] ?? []).map { try AddedToken(json: $0, path: path) }
        rawMatcher = AddedTokenMatcher(added.filter { !$0.isNormalized })
        normalizedMatcher = AddedTokenMatcher(added.filter { $0.isNormalized })
        addedTokens = Dictionary(added.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        specialIds = Set(added.filter { $0.isSpecial }.map { $0.id })
        vocabSize = max(model.idToToken.count, (added.map { Int($0.id) }.max() ?? -1) + 1)

        // Special token ids.
        var contentToId: [String: Int32] = [:]
        for t in added { contentToId[t.content] = t.id }
        let cfg = config.flatMap { (try? JSONSerialization.jsonObject(with: $0)) as? [String: Any] } ?? [:]
        let gen = generationConfig.flatMap { (try? JSONSerialization.jsonObject(with: $0)) as? [String: Any] } ?? [:]
        let vocab = model.vocab
        func configTokenId(_ key: String) -> Int32? {
            var content = cfg[key] as? String
            if content == nil, let obj = cfg[key] as? [String: Any] { content = obj["content"] as? String }
            guard let c = content else { return nil }
            return contentToId[c] ?? vocab[c]
        }
        func generationIds(_ key: String) -> [Int32] {
            if let i = gen[key] as? Int { return [Int32(i)] }
            if let a = gen[key] as? [Int] { return a.map(Int32.init) }
            return []
        }
        bosTokenId = generationIds("bos_token_id").first ?? configTokenId("bos_token")
        let eos = generationIds("eos_token_id")
        eosTokenIds = eos.isEmpty ? (configTokenId("eos_token").map { [$0] } ?? []) : eos
        padTokenId = generationIds("pad_token_id").first ?? configTokenId("pad_token")
    }

    // MARK: - Encoding

    /// Token ids of `text`. `addSpecialTokens` applies the post-processor (e.g. a BOS token), as
    /// `tokenizer(text)` does in transformers by default.
    public func encode(_ text: String, addSpecialTokens: Bool = true) throws -> [Int32] {
        var ids: [Int32] = []
        for segment in rawMatcher.split(text[...]) {
            switch segment {
            case let .token(id): ids.append(id)
            case let .text(raw):
                let normalized = normalizer?.apply(String(raw)) ?? String(raw)
                for piece in normalizedMatcher.split(normalized[...]) {
                    switch piece {
                    case let .token(id): ids.append(id)
                    case let .text(t): try encodeWords(String(t), into: &ids)
                    }
                }
            }
        }
        if addSpecialTokens, let post = postProcessor { ids = post.apply(ids) }
        return ids
    }

    private func encodeWords(_ text: String, into ids: inout [Int32]) throws {
        if text.isEmpty { return }
        var words: [String] = []
        if let pre = preTokenizer { pre.run(text, into: &words) } else { words = [text] }
        for w in words where !w.isEmpty { try model.encode(w, into: &ids) }
    }

    // MARK: - Decoding

    /// Text of `ids`; `skipSpecialTokens` drops added tokens marked special.
    public func decode(_ ids: [Int32], skipSpecialTokens: Bool = false) throws -> String {
        var bytes: [UInt8] = []
        for id in ids { try appendBytes(of: id, skipSpecial: skipSpecialTokens, to: &bytes) }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// A decoder for streaming one token at a time.
    public func makeStreamingDecoder(skipSpecialTokens: Bool = false) -> StreamingDecoder {
        StreamingDecoder(tokenizer: self, skipSpecialTokens: skipSpecialTokens)
    }

    /// The token string of an id (vocabulary or added token).
    public func token(for id: Int32) throws -> String {
        if let t = addedTokens[id] { return t.content }
        guard id >= 0, Int(id) < model.idToToken.count, !model.idToToken[Int(id)].isEmpty else {
            throw TokenizerError.tokenIdOutOfRange(Int(id), vocabSize: vocabSize)
        }
        return model.idToToken[Int(id)]
    }

    /// The id of a token string, if any.
    public func tokenId(for token: String) -> Int32? {
        addedTokens.first(where: { $0.value.content == token })?.key ?? model.vocab[token]
    }

    public func isSpecial(_ id: Int32) -> Bool { specialIds.contains(id) }

    func appendBytes(of id: Int32, skipSpecial: Bool, to bytes: inout [UInt8]) throws {
        if skipSpecial && specialIds.contains(id) { return }
        let t = try token(for: id)
        if decoder == nil { bytes.append(contentsOf: t.utf8) } else { ByteLevel.decode(t, into: &bytes) }
    }
}
