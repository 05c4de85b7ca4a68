// GPT-2's reversible byte <-> printable-character map (`bytes_to_unicode` in openai/gpt-2
// encoder.py): printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onward.
// Used by the ByteLevel pre-tokenizer (bytes -> characters before BPE) and decoder (back).

public enum ByteLevel {
    /// Character for each byte value.
    public static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: " ", count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            if printable {
                table[b] = Unicode.Scalar(UInt32(b))!
            } else {
                table[b] = Unicode.Scalar(next)!
                next += 1
            }
        }
        return table
    }()

    /// Byte for each mapped character (nil for characters outside the map).
    public static let scalarToByte: [UInt32: UInt8] = {
        var map: [UInt32: UInt8] = [:]
        for (b, s) in byteToScalar.enumerated() { map[s.value] = UInt8(b) }
        return map
    }()

    /// The mapped string of a piece of text's UTF-8 bytes.
    @inline(__always)
    public static func encode(_ text: Substring) -> String {
        var s = String.UnicodeScalarView()
        for b in text.utf8 { s.append(byteToScalar[Int(b)]) }
        return String(s)
    }

    /// Bytes of a token string. As the Rust implementation does, a token containing any
    /// character outside the map (an added token such as a non-ASCII special) contributes its own
    /// UTF-8 bytes unchanged.
    public static func decode(_ token: String, into bytes: inout [UInt8]) {
        var out: [UInt8] = []
        out.reserveCapacity(token.unicodeScalars.count)
        for s in token.unicodeScalars {
            guard let b = scalarToByte[s.value] else {
                bytes.append(contentsOf: token.utf8)
                return
            }
            out.append(b)
        }
        bytes.append(contentsOf: out)
    }
}
