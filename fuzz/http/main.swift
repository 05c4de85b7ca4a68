// HTTP/1.1 request framing (HTTPRequestParser over http_parser): the input arrives in two pieces
// split at its first byte's value, as a network would cut it. Errors are fine; crashes are not.
import Foundation
import FuzzCommon
import Server

runFuzzer { data, size in
    let bytes = UnsafeRawBufferPointer(start: data, count: size)
    let parser = HTTPRequestParser(maxHeaderBytes: 4096, maxBodyBytes: 1 << 16)
    let cut = size > 0 ? min(size, Int(bytes[0])) : 0
    do {
        _ = try parser.feed(UnsafeRawBufferPointer(rebasing: bytes[0..<cut]))
        _ = try parser.feed(UnsafeRawBufferPointer(rebasing: bytes[cut..<size]))
    } catch {}
    return 0
}
