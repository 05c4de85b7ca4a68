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

    /// Collects the body (or hands it to `onData`) and the headers.
    final class Sink {
        var body = Data()
        var headers: [String: String] = [:]
        /// Receives the body as it arrives (with the response's status) instead of `body`;
        /// false aborts the transfer.
        var onData: ((Int, UnsafeRawBufferPointer) -> Bool)?
        var status = 0
    }

    private static let initialised: Bool = {
        curl_global_init(Int(CURL_GLOBAL_DEFAULT))
        return true
    }()

    /// GETs `url` with `headers` ("Name: value"); `timeout` bounds the whole transfer (seconds).
    static func get(_ url: String, headers: [String], timeout: Int,
                    onData: ((Int, UnsafeRawBufferPointer) -> Bool)? = nil) -> Response {
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
        sink.onData = onData
        _ = ember_curl_set_long(curl, CURLOPT_BUFFERSIZE, 512 << 10)
        let me = Unmanaged.passUnretained(sink).toOpaque()
        _ = ember_curl_set_write(curl) { ptr, size, count, user in
            let sink = Unmanaged<Sink>.fromOpaque(user!).takeUnretainedValue()
            let n = size * count
            guard n > 0 else { return 0 }
            if let f = sink.onData { return f(sink.status, UnsafeRawBufferPointer(start: ptr, count: n)) ? n : 0 }
            ptr!.withMemoryRebound(to: UInt8.self, capacity: n) { sink.body.append($0, count: n) }
            return n
        }
        _ = ember_curl_set_pointer(curl, CURLOPT_WRITEDATA, me)
        _ = ember_curl_set_header(curl) { ptr, size, count, user in
            let sink = Unmanaged<Sink>.fromOpaque(user!).takeUnretainedValue()
            let n = size * count
            let line = String(decoding: UnsafeRawBufferPointer(start: ptr, count: n), as: UTF8.self)
            if line.hasPrefix("HTTP/") {
                // A new response (after a 100 Continue, say): its status, and no headers yet.
                sink.status = Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
                sink.headers = [:]
            } else if let colon = line.firstIndex(of: ":") {
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
