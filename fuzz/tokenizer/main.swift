// tokenizer.json loading: the input (split at its first NUL) is a tokenizer.json and a text; a
// loaded tokenizer encodes the text and decodes the ids.
import Foundation
import FuzzCommon
import Tokenizer

runFuzzer { data, size in
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let cut = bytes.firstIndex(of: 0) ?? bytes.count
    let json = Data(bytes[0..<cut])
    let text = String(decoding: bytes[min(cut + 1, bytes.count)...], as: UTF8.self)
    if let tok = try? Tokenizer(tokenizerJSON: json) {
        if let ids = try? tok.encode(text, addSpecialTokens: true) { _ = try? tok.decode(ids) }
    }
    return 0
}
