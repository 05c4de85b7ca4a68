// A blocking HTTP GET over libcurl (the design's HTTP client), for a replica's weight pulls.
// Each call uses its own easy handle, so any thread may call it.
import CCurl
import Foundation

enum HTTPClient {
    struct Response {
        /// 0 when the transfer failed before a status arrived.
        var status: Int
        var body: Data
        /// libcurl's error text when the transfer failed (the body holds what arrived before).
        var failure: String?
        var headers: [String: String]
    }

    /// Collects the body and the headers.
    final class Sink {
        var body = Data()
        var headers: [String: String] = [:]
    }

    private static let initialised: Bool = {
        curl_global_init(Int(CURL_GLOBAL_DEFAULT))
        return true
    }()

    /// GETs `url` with `headers` ("Name: value"); `timeout` bounds the whole transfer (seconds).
    static func get(_ url: String, headers: [String], timeout: Int, expectedBytes: Int = 0) -> Response {
        _ = initialised
        guard let curl = curl_easy_init() else { return Response(status: 0, body: Data(), failure: "cannot initialise libcurl", headers: [:]) }
        defer { curl_easy_cleanup(curl) }
        var list: UnsafeMutablePointer<curl_slist>?
        for h in headers { list = curl_slist_append(list, h) }
        defer { curl_slist_free_all(list) }
        _ = ember_curl_set_string(curl, CURLOPT_URL, url)
        _ = ember_curl_set_pointer(curl, CURLOPT_HTTPHEADER, UnsafeMutableRawPointer(list))
        _ = ember_curl_set_long(curl, CURLOPT_TIMEOUT, timeout)
        _ = ember_curl_set_long(curl, CURLOPT_CONNECTTIMEOUT, min(timeout, 10))
        _ = ember_curl_set_long(curl, CURLOPT_NOSIGNAL, 1)
        let sink = Sink()
        sink.body.reserveCapacity(expectedBytes)
        let me = Unmanaged.passUnretained(sink).toOpaque()
        _ = ember_curl_set_write(curl) { ptr, size, count, user in
            let sink = Unmanaged<Sink>.fromOpaque(user!).takeUnretainedValue()
            let n = size * count
            if n > 0 { ptr!.withMemoryRebound(to: UInt8.self, capacity: n) { sink.body.append($0, count: n) } }
            return n
        }
        _ = ember_curl_set_pointer(curl, CURLOPT_WRITEDATA, me)
        _ = ember_curl_set_header(curl) { ptr, size, count, user in
            let sink = Unmanaged<Sink>.fromOpaque(user!).takeUnretainedValue()
            let n = size * count
            let line = String(decoding: UnsafeRawBufferPointer(start: ptr, count: n), as: UTF8.self)
            if let colon = line.firstIndex(of: ":") {
                sink.headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespacesAndNewlines)
            }
            return n
        }
        _ = ember_curl_set_pointer(curl, CURLOPT_HEADERDATA, me)
        let rc = withExtendedLifetime(sink) { curl_easy_perform(curl) }
        var status = 0
        _ = ember_curl_get_status(curl, &status)
        let failure = rc == CURLE_OK ? nil : String(cString: curl_easy_strerror(rc))
        return Response(status: rc == CURLE_OK ? status : 0, body: sink.body, failure: failure, headers: sink.headers)
    }
}
