// tokenizer.json `model` of type BPE: vocabulary, ranked merges ("a b" strings or ["a", "b"]
// pairs), `ignore_merges` (Llama 3: a word already in the vocabulary is one token). A word is
// split into characters and the lowest-ranked adjacent pair (leftmost on ties) is merged until
// none remains, as the Rust implementation does: a min-heap of candidate pairs over a linked
// list of symbols, so a word of n characters costs O(n log n), not O(n^2) (a one-word 1 MB
// prompt stays cheap). Results are cached per word.
import Foundation

final class BPE {
    let vocab: [String: Int32]
    let idToToken: [String]
    private let ranks: [PairKey: Int32]       // (left id, right id) -> rank
    private let merged: [PairKey: Int32]      // (left id, right id) -> merged id
    let ignoreMerges: Bool
    private var cache: [String: [Int32]] = [:]
    private let lock = NSLock()
    /// Longer words are not cached, so the cache's memory stays bounded (as Hugging Face's).
    static let longestCachedWord = 256

    struct PairKey: Hashable {
        let a: Int32, b: Int32
    }

    init(json: [String: Any], path: String) throws {
        guard let vocabJSON = json["vocab"] as? [String: Any] else {
            throw TokenizerError.malformed(path: path, reason: "model.vocab is not an object")
        }
        if let dropout = json["dropout"] as? Double, dropout > 0 {
            throw TokenizerError.unsupported(component: "model.dropout", hint: "BPE dropout is a training-time option")
        }
        if json["byte_fallback"] as? Bool ?? false {
            throw TokenizerError.unsupported(component: "model.byte_fallback", hint: "only byte-level BPE is supported")
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if let v = json[key] as? String, !v.isEmpty {
                throw TokenizerError.unsupported(component: "model.\(key)", hint: "not used by byte-level BPE")
            }
        }
        var vocab: [String: Int32] = [:]
        var maxId = -1
        // Ids index an array: they must fit Int32 and be dense enough that a hostile file cannot
        // make the id table huge (Hugging Face vocabularies are dense, 0..<count).
        let idLimit = min(Int(Int32.max), 2 * vocabJSON.count + 65_536)
        for (token, idAny) in vocabJSON {
            guard let id = idAny as? Int, id >= 0, id < idLimit else {
                throw TokenizerError.malformed(path: path, reason: "vocab entry '\(token)' needs an id in 0..<\(idLimit) (ids of a \(vocabJSON.count)-entry vocabulary)")
            }
            vocab[token] = Int32(id)
            maxId = max(maxId, id)
        }
        var idToToken = [String](repeating: "", count: maxId + 1)
        for (t, id) in vocab { idToToken[Int(id)] = t }
        var ranks: [PairKey: Int32] = [:], merged: [PairKey: Int32] = [:]
        let mergesJSON = json["merges"] as? [Any] ?? []
        ranks.reserveCapacity(mergesJSON.count)
        for (rank, m) in mergesJSON.enumerated() {
            let pair: (String, String)
            if let s = m as? String {
                let parts = s.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false)
                guard parts.count == 2 else { throw TokenizerError.malformed(path: path, reason: "merge '\(s)' is not 'a b'") }
                pair = (String(parts[0]), String(parts[1]))
            } else if let a = m as? [String], a.count == 2 {
                pair = (a[0], a[1])
            } else {
                throw TokenizerError.malformed(path: path, reason: "merge \(rank) is neither 'a b' nor [a, b]")
            }
            guard let a = vocab[pair.0], let b = vocab[pair.1], let ab = vocab[pair.0 + pair.1] else {
                throw TokenizerError.malformed(path: path, reason: "merge '\(pair.0) \(pair.1)' uses tokens missing from the vocabulary")
            }
            let key = PairKey(a: a, b: b)
            if ranks[key] == nil { ranks[key] = Int32(rank); merged[key] = ab }
        }
        self.vocab = vocab
        self.idToToken = idToToken
        self.ranks = ranks
        self.merged = merged
        ignoreMerges = json["ignore_merges"] as? Bool ?? false
    }

    /// Token ids of one pre-token (a byte-level string).
    func encode(_ word: String, into out: inout [Int32]) throws {
        if ignoreMerges, let id = vocab[word] { out.append(id); return }
        lock.lock()
        if let hit = cache[word] { lock.unlock(); out.append(contentsOf: hit); return }
        lock.unlock()
        var symbols: [Int32] = []
        symbols.reserveCapacity(word.unicodeScalars.count)
        for s in word.unicodeScalars {
            guard let id = vocab[String(s)] else { throw TokenizerError.unknownToken(String(s)) }
            symbols.append(id)
        }
        symbols = merge(symbols)
        if word.utf8.count <= Self.longestCachedWord {
            lock.lock()
            if cache.count > 200_000 { cache.removeAll(keepingCapacity: true) }
            cache[word] = symbols
            lock.unlock()
        }
        out.append(contentsOf: symbols)
    }

    /// Applies merges to `symbols` until no adjacent pair has a rank. Heap entries pack
    /// (rank, position) into one UInt64, so the smallest is the lowest rank, leftmost on ties;
    /// an entry whose left symbol was absorbed or whose pair has changed since is skipped.
    func merge(_ symbols: [Int32]) -> [Int32] {
        let n = symbols.count
        if n < 2 { return symbols }
        var id = symbols
        var next = [Int32](unsafeUninitializedCapacity: n) { buf, count in
            for i in 0..<n { buf[i] = Int32(i + 1) }
            buf[n - 1] = -1
            count = n
        }
        var prev = [Int32](unsafeUninitializedCapacity: n) { buf, count in
            for i in 0..<n { buf[i] = Int32(i - 1) }
            count = n
        }
        var alive = [Bool](repeating: true, count: n)
        var heap = MinHeap()
        func push(_ left: Int32) {
            let right = next[Int(left)]
            guard right >= 0, let r = ranks[PairKey(a: id[Int(left)], b: id[Int(right)])] else { return }
            heap.push(UInt64(UInt32(r)) << 32 | UInt64(UInt32(left)))
        }
        for i in 0..<(n - 1) { push(Int32(i)) }
        while let top = heap.pop() {
            let rank = Int32(truncatingIfNeeded: top >> 32), pos = Int(UInt32(truncatingIfNeeded: top))
            guard alive[pos] else { continue }
            let right = Int(next[pos])
            guard right >= 0 else { continue }
            let key = PairKey(a: id[pos], b: id[right])
            guard ranks[key] == rank else { continue }
            id[pos] = merged[key]!
            alive[right] = false
            let after = next[right]
            next[pos] = after
            if after >= 0 { prev[Int(after)] = Int32(pos) }
            if prev[pos] >= 0 { push(prev[pos]) }
            push(Int32(pos))
        }
        var out: [Int32] = []
        var i: Int32 = 0
        while i >= 0 { out.append(id[Int(i)]); i = next[Int(i)] }
        return out
    }
}

/// A binary min-heap of UInt64.
struct MinHeap {
    private var items: [UInt64] = []

    mutating func push(_ x: UInt64) {
        items.append(x)
        var i = items.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            if items[parent] <= items[i] { break }
            items.swapAt(parent, i)
            i = parent
        }
    }

    mutating func pop() -> UInt64? {
        guard let last = items.popLast() else { return nil }
        guard !items.isEmpty else { return last }
        let top = items[0]
        items[0] = last
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < items.count && items[l] < items[m] { m = l }
            if r < items.count && items[r] < items[m] { m = r }
            if m == i { break }
            items.swapAt(m, i)
            i = m
        }
        return top
    }
}
