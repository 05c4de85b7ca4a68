// HTTP/1.1 framing without sockets: pipelining, byte-by-byte arrival, chunked bodies, keep-alive,
// Expect: 100-continue, size limits (431, 413) and request smuggling (Content-Length with
// Transfer-Encoding) refused.
import Foundation
import Server
import XCTest

final class HTTPRequestParserTests: XCTestCase {
    func feed(_ p: HTTPRequestParser, _ s: String) throws -> [HTTPRequest] { try p.feed(Data(s.utf8)) }

    func testPipelinedRequestsAndBodies() throws {
        let p = HTTPRequestParser()
        let two = "POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello" +
                  "GET /healthz?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        let reqs = try feed(p, two)
        XCTAssertEqual(reqs.count, 2)
        XCTAssertEqual(reqs[0].method, "POST")
        XCTAssertEqual(reqs[0].path, "/rpc")
        XCTAssertEqual(String(decoding: reqs[0].body, as: UTF8.self), "hello")
        XCTAssertEqual(reqs[0].header("content-type"), "application/json")
        XCTAssertTrue(reqs[0].keepAlive)
        XCTAssertEqual(reqs[1].method, "GET")
        XCTAssertEqual(reqs[1].path, "/healthz")
        XCTAssertEqual(reqs[1].target, "/healthz?verbose=1")
        XCTAssertFalse(p.isMidRequest)
    }

    func testByteByByteAndChunked() throws {
        let p = HTTPRequestParser()
        let raw = "POST /rpc HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"
        var got: [HTTPRequest] = []
        for b in raw.utf8 {
            got += try p.feed(Data([b]))
            if got.isEmpty && b == UInt8(ascii: "W") { XCTAssertTrue(p.isMidRequest) }
        }
        XCTAssertEqual(got.count, 1)
        XCTAssertEqual(String(decoding: got[0].body, as: UTF8.self), "Wikipedia")
        XCTAssertFalse(got[0].keepAlive, "Connection: close")
        let old = try feed(HTTPRequestParser(), "GET / HTTP/1.0\r\n\r\n")
        XCTAssertFalse(old[0].keepAlive, "HTTP/1.0 without keep-alive")
    }

    func testExpectContinue() throws {
        let p = HTTPRequestParser()
        XCTAssertTrue(try feed(p, "POST /rpc HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").isEmpty)
        XCTAssertTrue(p.expectsContinue)
        let r = try feed(p, "{}")
        XCTAssertEqual(r.count, 1)
        XCTAssertFalse(p.expectsContinue)
    }

    func testLimitsAndMalformedRequests() {
        func status(_ s: String, maxHeader: Int = 16 << 10, maxBody: Int = 1 << 20) -> Int? {
            do { _ = try HTTPRequestParser(maxHeaderBytes: maxHeader, maxBodyBytes: maxBody).feed(Data(s.utf8)); return nil } catch {
                return (error as? HTTPParseError)?.status
            }
        }
        XCTAssertEqual(status("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), 400,
                       "Content-Length with Transfer-Encoding (smuggling)")
        XCTAssertEqual(status("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc"), 400, "two lengths")
        XCTAssertEqual(status("NOT A REQUEST\r\n\r\n"), 400)
        XCTAssertEqual(status("GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 20_000) + "\r\n\r\n"), 431)
        XCTAssertEqual(status("POST / HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n"), 413)
        XCTAssertEqual(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + String(repeating: "x", count: 1024) + "\r\n",
                              maxBody: 1000), 413, "chunked body over the limit")
        // Obsolete line folding is refused wherever the read boundaries fall; a body holding
        // "\n " in a pipelined stream (not a header) is not mistaken for one.
        for folded in ["POST / HTTP/1.1\r\nContent-Length:\r\n 3\r\n\r\nabc", "GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n",
                       "GET / HTTP/1.1\r\nX: a\r\n  b\r\nY: c\r\n\r\n"] {
            XCTAssertEqual(status(folded), 400, folded)
            for cut in 1..<folded.utf8.count {
                let p = HTTPRequestParser()
                let bytes = Array(folded.utf8)
                XCTAssertThrowsError(try { _ = try p.feed(Data(bytes[..<cut])); _ = try p.feed(Data(bytes[cut...])) }(), "cut at \(cut)")
            }
        }
        let bodyWithFold = "POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n{\n }GET / HTTP/1.1\r\nX:  y \r\n\r\n"
        for cut in 1..<bodyWithFold.utf8.count {
            let p = HTTPRequestParser()
            let bytes = Array(bodyWithFold.utf8)
            let got = (try? p.feed(Data(bytes[..<cut])) + p.feed(Data(bytes[cut...]))) ?? []
            XCTAssertEqual(got.count, 2, "cut at \(cut)")
            XCTAssertEqual(got.last?.header("X"), "y ", "cut at \(cut)")
        }
        // A failed parser stays failed.
        let p = HTTPRequestParser()
        XCTAssertThrowsError(try p.feed(Data("garbage\r\n\r\n".utf8)))
        XCTAssertThrowsError(try p.feed(Data("GET / HTTP/1.1\r\n\r\n".utf8)))
    }
}
