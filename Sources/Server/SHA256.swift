// SHA-256 from OpenSSL's libcrypto (SHA extensions where the CPU has them), as lowercase hex.
import CCrypto
import Foundation

enum SHA256 {
    static func hex(_ bytes: UnsafeRawPointer, count: Int) -> String {
        var digest = [UInt8](repeating: 0, count: Int(SHA256_DIGEST_LENGTH))
        _ = CCrypto.SHA256(bytes.assumingMemoryBound(to: UInt8.self), count, &digest)
        return hexString(digest)
    }

    static func hex(_ data: Data) -> String {
        data.withUnsafeBytes { hex($0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, count: data.count) }
    }

    /// A hash fed in pieces; `finish` gives the hex digest and starts over.
    final class Streaming {
        private let context = EVP_MD_CTX_new()
        init() { EVP_DigestInit_ex(context, EVP_sha256(), nil) }
        deinit { EVP_MD_CTX_free(context) }
        func update(_ bytes: UnsafeRawPointer, count: Int) { EVP_DigestUpdate(context, bytes, count) }
        func finish() -> String {
            var digest = [UInt8](repeating: 0, count: Int(SHA256_DIGEST_LENGTH))
            var n: UInt32 = 0
            EVP_DigestFinal_ex(context, &digest, &n)
            EVP_DigestInit_ex(context, EVP_sha256(), nil)
            return hexString(digest)
        }
    }

    static func hexString(_ digest: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8](); out.reserveCapacity(digest.count * 2)
        for b in digest { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }
}
