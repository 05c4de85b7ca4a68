// A replica's weight follower (`ember-server --follow URL`): it long-polls the trainer's
// manifest, downloads only the tensors and adapters whose SHA-256 changed (ranges of one
// version, pinned with If-Match, resumed where a transfer broke), checks every hash, and swaps
// the staged weights in as an exclusive job: generations in flight finish on the old weights,
// calls queued behind the swap run on the new ones (docs/design-notes.md, "Replicas").
import Foundation
import Logging
import RPC
import Weights

/// Sendable by hand: sync state is touched only under `syncLock` (one sync at a time), figures
/// under `lock`.
public final class WeightFollower: @unchecked Sendable {
    public let url: String
    let apiKey: String?
    let scheduler: Scheduler
    let logger: Logger
    let staging: String

    private let syncLock = NSLock()
    private let lock = NSLock()
    private var stopped = false

    // Under syncLock.
    /// SHA-256 of every base tensor as this replica holds it (the trainer's bytes it applied).
    private var tensorHashes: [String: String] = [:]
    private var adapterHashes: [String: String] = [:]
    private var checkedModel = false
    /// Tensors downloaded and verified but not applied yet, by hash: a sync restarted on a newer
    /// version keeps the ones that did not change.
    private var stagedTensors: [String: Data] = [:]

    // Under lock.
    private var applied = (version: -1, id: "")
    private var latestSeen = 0
    private var syncs = 0, errors = 0, bytesTotal = 0, lastBytes = 0
    private var secondsTotal = 0.0, lastSeconds = 0.0

    public struct Figures { public let syncs, errors, bytesTotal, lastBytes, lag: Int; public let secondsTotal, lastSeconds: Double }
    public var figures: Figures {
        lock.lock(); defer { lock.unlock() }
        return Figures(syncs: syncs, errors: errors, bytesTotal: bytesTotal, lastBytes: lastBytes,
                       lag: max(0, latestSeen - applied.version), secondsTotal: secondsTotal, lastSeconds: lastSeconds)
    }
    /// The version applied (-1 before the first sync).
    public var appliedVersion: Int { lock.lock(); defer { lock.unlock() }; return applied.version }

    public enum FollowError: Error, CustomStringConvertible {
        /// The trainer could not be reached or answered with an error (retried).
        case transport(String)
        /// The trainer serves another model, or refuses the key: following it cannot work.
        case fatal(String)
        /// The version moved on during the download: read the manifest again.
        case superseded
        /// Bytes that do not hash to the manifest's digest, or a malformed manifest.
        case corrupt(String)

        public var description: String {
            switch self {
            case let .transport(s): s
            case let .fatal(s): s
            case .superseded: "the trainer published a newer version during the download"
            case let .corrupt(s): s
            }
        }
    }

    public init(url: String, apiKey: String?, scheduler: Scheduler, logger: Logger) {
        self.url = url.hasSuffix("/") ? String(url.dropLast()) : url
        self.apiKey = apiKey
        self.scheduler = scheduler
        self.logger = logger
        staging = NSTemporaryDirectory() + "/ember-follow-\(getpid())"
        scheduler.setFollowerHook { [weak self] method, params, completion in
            guard let self else { completion(.failure(RPCError(.shuttingDown))); return }
            let box = JSONValue(params)
            DispatchQueue.global().async { completion(self.weightsSync(box.value)) }
        }
    }

    // MARK: - Manifest

    struct Manifest {
        struct Tensor { let name, dtype, sha256: String; let shape: [Int]; let offset, length: Int }
        struct Adapter { let name, sha256: String; let weightsVersion, length: Int; let config: [String: Any] }
        let version: Int
        let id: String
        let model: Any
        let tensors: [Tensor]
        let adapters: [Adapter]
        let length: Int

        init(_ data: Data) throws {
            guard let o = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
                  let v = o["weights_version"] as? Int, let id = o["manifest_id"] as? String, let model = o["model"],
                  let ts = o["tensors"] as? [[String: Any]], let ads = o["adapters"] as? [[String: Any]], let length = o["length"] as? Int else {
                throw FollowError.corrupt("the trainer's manifest is not the expected JSON object")
            }
            version = v; self.id = id; self.model = model; self.length = length
            tensors = try ts.map { t in
                guard let n = t["name"] as? String, let d = t["dtype"] as? String, let h = t["sha256"] as? String,
                      let s = t["shape"] as? [Int], let off = t["offset"] as? Int, let len = t["length"] as? Int,
                      off >= 0, len >= 0, off + len <= length else {
                    throw FollowError.corrupt("a tensor entry of the trainer's manifest is malformed")
                }
                return Tensor(name: n, dtype: d, sha256: h, shape: s, offset: off, length: len)
            }
            adapters = try ads.map { a in
                guard let n = a["name"] as? String, let h = a["sha256"] as? String, let v = a["weights_version"] as? Int,
                      let len = a["length"] as? Int, let c = a["config"] as? [String: Any] else {
                    throw FollowError.corrupt("an adapter entry of the trainer's manifest is malformed")
                }
                return Adapter(name: n, sha256: h, weightsVersion: v, length: len, config: c)
            }
        }
    }

    private var authHeaders: [String] { apiKey.map { ["Authorization: Bearer \($0)"] } ?? [] }

    /// The trainer's manifest; with `changed`/`after`, a long poll of `poll` seconds (nil: nothing new).
    func fetchManifest(changed: String? = nil, after: Int? = nil, poll: Int = 0) throws -> Manifest? {
        var q: [String] = []
        if let changed { q.append("changed=\(changed)") }
        if let after { q.append("after=\(after)") }
        if changed != nil || after != nil { q.append("timeout=\(poll)") }
        let r = HTTPClient.get(url + "/v1/weights/manifest" + (q.isEmpty ? "" : "?" + q.joined(separator: "&")),
                               headers: authHeaders, timeout: poll + 30)
        if let f = r.failure { throw FollowError.transport("cannot reach \(url): \(f)") }
        if r.status == 304 { return nil }
        if r.status == 401 || r.status == 403 {
            throw FollowError.fatal("\(url) refused this replica's key (HTTP \(r.status)); pass the trainer's API key with --follow-api-key or EMBER_FOLLOW_API_KEY")
        }
        guard r.status == 200 else {
            throw FollowError.transport("\(url)/v1/weights/manifest answered \(r.status): \(String(decoding: r.body.prefix(300), as: UTF8.self))")
        }
        let m = try Manifest(r.body)
        lock.lock(); latestSeen = max(latestSeen, m.version); lock.unlock()
        return m
    }

    // MARK: - Sync

    /// Pulls `m` and swaps it in; returns the bytes downloaded. Caller holds `syncLock`.
    private func sync(_ m: Manifest) throws -> Int {
        let t0 = Date()
        if !checkedModel {
            let config = JSONValue(m.model)
            let same = try wait { d in d.sameModel(config.value as Any) } as? Bool ?? false
            guard same else {
                throw FollowError.fatal("the trainer at \(url) serves another model (its config.json differs from this replica's); start the replica with the trainer's model folder")
            }
            checkedModel = true
        }
        if tensorHashes.isEmpty {
            // What this replica holds already (same base model: nothing to download until a step).
            guard let dtype = DType(rawValue: m.tensors.first?.dtype ?? "F32") else { throw FollowError.corrupt("unknown dtype in the manifest") }
            let image = try wait { d in try d.model.weightsImage(dtype: dtype) } as! SafetensorsImage
            for e in image.entries { tensorHashes[e.name] = SHA256.hex(image.bytes + e.offset, count: e.length) }
        }
        var bytes = 0
        // Base tensors: contiguous runs of changed tensors, one pinned range request each.
        let changed = m.tensors.filter { tensorHashes[$0.name] != $0.sha256 && stagedTensors[$0.sha256] == nil }
        var runs: [[Manifest.Tensor]] = []
        for t in changed.sorted(by: { $0.offset < $1.offset }) {
            if let last = runs.last?.last, last.offset + last.length == t.offset { runs[runs.count - 1].append(t) } else { runs.append([t]) }
        }
        for run in runs {
            let lo = run[0].offset, hi = run.last!.offset + run.last!.length
            let data = try download(from: lo, to: hi, etag: "\"\(m.version)\"", query: "")
            bytes += data.count
            for t in run {
                let slice = data.subdata(in: (t.offset - lo)..<(t.offset - lo + t.length))
                guard SHA256.hex(slice) == t.sha256 else { throw FollowError.corrupt("tensor '\(t.name)' does not match its SHA-256") }
                stagedTensors[t.sha256] = slice
            }
        }
        // Adapters whose bytes changed: whole files (megabytes), written as PEFT folders.
        try? FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        var adapters: [FollowedWeights.Adapter] = []
        var folders: [String] = []
        for a in m.adapters {
            if adapterHashes[a.name] == a.sha256 {
                adapters.append(.init(name: a.name, weightsVersion: a.weightsVersion, folder: nil))
                continue
            }
            let name = a.name.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? a.name
            let data = try download(from: 0, to: a.length, etag: "\"\(a.sha256)\"", query: "?adapter=\(name)")
            bytes += data.count
            guard SHA256.hex(data) == a.sha256 else { throw FollowError.corrupt("adapter '\(a.name)' does not match its SHA-256") }
            let folder = staging + "/\(a.sha256.prefix(16))"
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
            try data.write(to: URL(fileURLWithPath: folder + "/adapter_model.safetensors"))
            try JSONSerialization.data(withJSONObject: a.config).write(to: URL(fileURLWithPath: folder + "/adapter_config.json"))
            folders.append(folder)
            adapters.append(.init(name: a.name, weightsVersion: a.weightsVersion, folder: folder))
        }
        defer { for f in folders { try? FileManager.default.removeItem(atPath: f) } }
        let tensors = m.tensors.filter { tensorHashes[$0.name] != $0.sha256 }.map { t in
            FollowedWeights.Tensor(name: t.name, dtype: DType(rawValue: t.dtype) ?? .f32, shape: t.shape, bytes: stagedTensors[t.sha256]!)
        }
        let update = FollowedWeights(weightsVersion: m.version, tensors: tensors, adapters: adapters)
        _ = try wait { d in try d.applyFollowed(update) }
        for t in m.tensors { tensorHashes[t.name] = t.sha256 }
        adapterHashes = Dictionary(uniqueKeysWithValues: m.adapters.map { ($0.name, $0.sha256) })
        stagedTensors = [:]
        let seconds = Date().timeIntervalSince(t0)
        lock.lock()
        applied = (m.version, m.id)
        syncs += 1; bytesTotal += bytes; lastBytes = bytes; secondsTotal += seconds; lastSeconds = seconds
        lock.unlock()
        logger.info("weights synced", metadata: ["weights_version": "\(m.version)", "tensors": "\(tensors.count)",
                                                 "adapters": "\(adapters.filter { $0.folder != nil }.count)", "bytes": "\(bytes)",
                                                 "seconds": "\(String(format: "%.3f", seconds))"])
        return bytes
    }

    /// Bytes [lo, hi) of the body of version `etag`; a broken transfer resumes where it stopped.
    private func download(from lo: Int, to hi: Int, etag: String, query: String) throws -> Data {
        var data = Data()
        data.reserveCapacity(hi - lo)
        var attempts = 0
        while lo + data.count < hi {
            let start = lo + data.count
            let r = HTTPClient.get(url + "/v1/weights" + query,
                                   headers: authHeaders + ["If-Match: \(etag)", "Range: bytes=\(start)-\(hi - 1)"],
                                   timeout: 600, expectedBytes: hi - start)
            if r.status == 412 { throw FollowError.superseded }
            if r.status == 206 || (r.status == 0 && !r.body.isEmpty) {
                // A 206 only: a transfer cut short keeps what arrived, and the next request continues.
                if r.status == 206 || r.headers["content-range"]?.hasPrefix("bytes \(start)-") == true {
                    data.append(r.body.prefix(hi - start))
                }
            } else if r.status == 200 {
                data.append(r.body.dropFirst(start).prefix(hi - start))
            } else if r.status != 0 {
                throw FollowError.transport("\(url)/v1/weights\(query) answered \(r.status): \(String(decoding: r.body.prefix(300), as: UTF8.self))")
            }
            if lo + data.count < hi {
                attempts += 1
                guard attempts < 5 else { throw FollowError.transport("the download from \(url) broke off \(attempts) times: \(r.failure ?? "short body")") }
                logger.notice("weights download interrupted; resuming", metadata: ["received": "\(data.count)", "of": "\(hi - lo)",
                                                                                  "error": "\(r.failure ?? "short body")"])
                lock.lock(); errors += 1; lock.unlock()
            }
        }
        return data
    }

    /// Runs `body` as an exclusive job on the compute thread and waits for it.
    private func wait(_ body: @escaping @Sendable (Dispatcher) throws -> Any) throws -> Any {
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var outcome: Result<Any, RPCError> = .failure(RPCError(.internalError))
        scheduler.exclusive(body) { r in outcome = r; done.signal() }
        done.wait()
        return try outcome.get()
    }

    /// Pulls the newest manifest and applies it unless it is applied already; a superseded
    /// download starts again on the newer version (its verified tensors kept).
    @discardableResult
    func pullNow(_ m0: Manifest? = nil) throws -> Int {
        syncLock.lock(); defer { syncLock.unlock() }
        var m = m0
        for _ in 0..<8 {
            let manifest: Manifest
            if let m { manifest = m } else { manifest = try fetchManifest()! }
            m = nil
            lock.lock(); let have = applied; lock.unlock()
            if manifest.id == have.id { return 0 }
            do { return try sync(manifest) } catch FollowError.superseded { continue }
        }
        throw FollowError.transport("the trainer published new versions faster than this replica could download one (8 tries)")
    }

    // MARK: - Running

    /// Before serving: pulls the trainer's current version, retrying while it cannot be reached
    /// (a trainer starting up). Throws only when following cannot work (another model).
    public func initialSync(retryFor seconds: Double = 600) throws {
        let deadline = Date().addingTimeInterval(seconds)
        var delay = 0.5
        while true {
            do { try pullNow(); return } catch let e as FollowError {
                if case .fatal = e { throw e }
                guard Date() < deadline else { throw e }
                logger.warning("cannot sync with the trainer yet; retrying", metadata: ["url": "\(url)", "error": "\(e)"])
                lock.lock(); errors += 1; lock.unlock()
                Thread.sleep(forTimeInterval: delay)
                delay = min(delay * 2, 10)
            }
        }
    }

    /// Follows in the background: long polls for a changed manifest and applies each.
    public func start(pollSeconds: Int = 30) {
        let t = Thread { [self] in
            var delay = 0.5
            while true {
                lock.lock(); let stop = stopped; let id = applied.id; lock.unlock()
                if stop { return }
                do {
                    if let m = try fetchManifest(changed: id, poll: pollSeconds) { try pullNow(m) }
                    delay = 0.5
                } catch {
                    lock.lock(); errors += 1; lock.unlock()
                    logger.warning("weight sync failed; retrying", metadata: ["url": "\(url)", "error": "\(error)"])
                    Thread.sleep(forTimeInterval: delay)
                    delay = min(delay * 2, 10)
                }
            }
        }
        t.name = "ember.follow"
        t.start()
    }

    public func stop() {
        lock.lock(); stopped = true; lock.unlock()
        try? FileManager.default.removeItem(atPath: staging)
    }

    /// `weights.sync {version?, timeout?}`: pulls now; with `version`, first waits (long polls)
    /// until the trainer has published it. Answers once the version is applied.
    func weightsSync(_ params: Any?) -> Result<Any, RPCError> {
        do {
            let p = try Params(params)
            try p.only(["version", "timeout"])
            let target: Int? = p.has("version") ? try p.int("version", min: 0) : nil
            let timeout = Double(try p.float("timeout", 60, min: 0, max: 3600))
            let deadline = Date().addingTimeInterval(timeout)
            var m: Manifest?
            if let target {
                // The first request answers at once; later ones wait for the version to change.
                var last: Int?
                while appliedVersion < target {
                    let left = Int(deadline.timeIntervalSinceNow.rounded(.up))
                    if let got = try fetchManifest(after: last, poll: max(0, min(left, 300))) {
                        if got.version >= target { m = got; break }
                        last = got.version
                    }
                    if Date() >= deadline {
                        throw RPCError(.syncFailed, path: "params.version",
                                       hint: "the trainer has not published version \(target) within \(timeout) s (it is at \(latestSeenVersion())); raise params.timeout or check that it is training")
                    }
                }
                if m == nil { return .success(answer()) }
            }
            try pullNow(m)
            return .success(answer())
        } catch let e as RPCError {
            return .failure(e)
        } catch let e as FollowError {
            lock.lock(); errors += 1; lock.unlock()
            return .failure(RPCError(.syncFailed, hint: "\(e)"))
        } catch {
            return .failure(Dispatcher.translate(error))
        }
    }

    private func latestSeenVersion() -> Int { lock.lock(); defer { lock.unlock() }; return latestSeen }

    private func answer() -> [String: Any] {
        lock.lock(); defer { lock.unlock() }
        return ["weights_version": applied.version, "manifest_id": applied.id, "bytes": lastBytes, "seconds": lastSeconds,
                "lag": max(0, latestSeen - applied.version)]
    }
}
