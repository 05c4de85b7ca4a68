// A replica's weight follower (`ember-server --follow URL`): it long-polls the trainer's
// manifest, downloads only the tensors and adapters whose SHA-256 changed (ranges of one
// version, pinned with If-Match, resumed where a transfer broke), checks every hash, and swaps
// the staged weights in as an exclusive job: generations in flight finish on the old weights,
// calls queued behind the swap run on the new ones (docs/design-notes.md, "Replicas").
import Foundation
import Kernels
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

    private let syncLock = NSLock()
    private let lock = NSLock()
    private var stopped = false

    // Under syncLock.
    /// SHA-256 of every base tensor as this replica holds it (the trainer's bytes it applied).
    private var tensorHashes: [String: String] = [:]
    private var adapterHashes: [String: String] = [:]
    private var checkedModel = false
    /// Tensors downloaded and verified but not applied yet, by hash (a run of tensors and the
    /// tensor's range in it): a sync restarted on a newer version keeps the ones that did not change.
    private var stagedTensors: [String: (ByteBlock, Range<Int>)] = [:]
    /// The last swap's download blocks (tensor parts and adapter files), kept for the next sync:
    /// a replica needs that memory at every sync anyway, and fresh pages cost more than the copy.
    private var recycledBlocks: [ByteBlock] = []

    /// A recycled block of exactly `count` bytes (`exact`), or the smallest of at least that.
    private func recycledBlock(_ count: Int, exact: Bool) -> ByteBlock? {
        let fits = recycledBlocks.indices.filter { exact ? recycledBlocks[$0].count == count : recycledBlocks[$0].count >= count }
        guard let i = fits.min(by: { recycledBlocks[$0].count < recycledBlocks[$1].count }) else { return nil }
        return recycledBlocks.remove(at: i)
    }

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
        scheduler.setFollowerHook { [weak self] method, params, completion in
            guard let self else { completion(.failure(RPCError(.shuttingDown))); return }
            let box = JSONValue(params)
            DispatchQueue.global().async { completion(self.weightsSync(box.value)) }
        }
    }

    // MARK: - Manifest

    struct Manifest {
        struct Tensor { let name, dtype, sha256: String; let shape: [Int]; let offset, length: Int }
        struct Adapter {
            let name, sha256: String; let weightsVersion, length: Int; let config: [String: Any]
            /// The file's chunks with their digests (the whole file as one chunk when the
            /// trainer lists none).
            let chunks: [Tensor]
        }
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
                var chunks = [Tensor(name: "the trainer's adapter '\(n)'", dtype: "U8", sha256: h, shape: [len], offset: 0, length: len)]
                if let list = a["chunks"] as? [[String: Any]] {
                    var end = 0
                    chunks = try list.map { c in
                        guard let off = c["offset"] as? Int, let l = c["length"] as? Int, let ch = c["sha256"] as? String,
                              off == end, l > 0 || len == 0 else {
                            throw FollowError.corrupt("the chunks of adapter '\(n)' in the trainer's manifest are malformed")
                        }
                        end = off + l
                        return Tensor(name: "the trainer's adapter '\(n)' (bytes \(off)-\(off + l - 1))", dtype: "U8", sha256: ch,
                                      shape: [l], offset: off, length: l)
                    }
                    guard end == len, !chunks.isEmpty else {
                        throw FollowError.corrupt("the chunks of adapter '\(n)' in the trainer's manifest do not cover its \(len) bytes")
                    }
                }
                return Adapter(name: n, sha256: h, weightsVersion: v, length: len, config: c, chunks: chunks)
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
            tensorHashes = try wait { d in d.tensorDigests(dtype: dtype) { SHA256.hex($0, count: $1) } } as! [String: String]
        }
        var bytes = 0
        var downloadSeconds = 0.0
        // Base tensors: changed ones in contiguous parts, fetched on two connections, each tensor's
        // hash checked as soon as its bytes are in.
        let changed = m.tensors.filter { tensorHashes[$0.name] != $0.sha256 && stagedTensors[$0.sha256] == nil }
        let td = Date()
        let fetched = try fetchTensors(changed.map { t in
            Manifest.Tensor(name: "tensor '\(t.name)'", dtype: t.dtype, sha256: t.sha256, shape: t.shape, offset: t.offset, length: t.length)
        }, etag: "\"\(m.version)\"")
        downloadSeconds = Date().timeIntervalSince(td)
        for (sha, v) in fetched { stagedTensors[sha] = v; bytes += v.1.count }
        // Adapters whose bytes changed: whole files (megabytes), loaded from memory.
        var adapters: [FollowedWeights.Adapter] = []
        let ta = Date()
        for a in m.adapters {
            if adapterHashes[a.name] == a.sha256 {
                adapters.append(.init(name: a.name, weightsVersion: a.weightsVersion, files: nil))
                continue
            }
            let name = a.name.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? a.name
            // The file's chunks, on parallel connections into one block (the previous download's
            // when it has this size), each checked as its bytes arrive.
            let block = recycledBlock(a.length, exact: true)
                ?? ByteBlock(adopting: .allocate(byteCount: max(1, a.length), alignment: 64), count: a.length)
            _ = try fetchTensors(a.chunks, etag: "\"\(a.sha256)\"", query: "?adapter=\(name)", into: block)
            bytes += block.count
            adapters.append(.init(name: a.name, weightsVersion: a.weightsVersion, files: (a.config, block)))
        }
        let adapterSeconds = Date().timeIntervalSince(ta)
        let tensors = m.tensors.filter { tensorHashes[$0.name] != $0.sha256 }.map { t in
            FollowedWeights.Tensor(name: t.name, dtype: DType(rawValue: t.dtype) ?? .f32, shape: t.shape,
                                   bytes: stagedTensors[t.sha256]!.0, range: stagedTensors[t.sha256]!.1)
        }
        let adaptersDownloaded = adapters.filter { $0.files != nil }.count
        var blocks = adapters.compactMap { $0.files?.1 }   // (recycled after the swap)
        for (block, _) in stagedTensors.values where !blocks.contains(where: { $0 === block }) { blocks.append(block) }
        let ts = Date()
        try apply(FollowedWeights(weightsVersion: m.version, tensors: tensors, adapters: adapters))
        let swapSeconds = Date().timeIntervalSince(ts)
        // The downloaded blocks serve the next sync: the swap copied every byte out of them and
        // nothing reads them again (the scheduler may still hold the finished job a
        // moment, so their reference counts say nothing). Fresh pages cost far more than the
        // copy on this kind of VM (docs/benchmarks.md, "Weight sync").
        recycledBlocks = blocks
        for t in m.tensors { tensorHashes[t.name] = t.sha256 }
        adapterHashes = Dictionary(uniqueKeysWithValues: m.adapters.map { ($0.name, $0.sha256) })
        stagedTensors = [:]
        let seconds = Date().timeIntervalSince(t0)
        lock.lock()
        applied = (m.version, m.id)
        syncs += 1; bytesTotal += bytes; lastBytes = bytes; secondsTotal += seconds; lastSeconds = seconds
        lock.unlock()
        logger.info("weights synced", metadata: ["weights_version": "\(m.version)", "tensors": "\(tensors.count)",
                                                 "adapters": "\(adaptersDownloaded)", "bytes": "\(bytes)",
                                                 "seconds": "\(String(format: "%.3f", seconds))",
                                                 "download_seconds": "\(String(format: "%.3f", downloadSeconds))",
                                                 "adapter_download_seconds": "\(String(format: "%.3f", adapterSeconds))",
                                                 "swap_seconds": "\(String(format: "%.3f", swapSeconds))"])
        return bytes
    }

    /// Swaps `update` in on the compute thread.
    private func apply(_ update: FollowedWeights) throws {
        _ = try wait { d in try d.applyFollowed(update) }
    }

    /// Downloads `tensors` of the version `etag` names: contiguous runs split into parts of at
    /// most half the bytes, two connections at a time. Each part lands in one buffer; each tensor
    /// is hashed as soon as its last byte arrives (while the rest streams in); a broken transfer
    /// resumes where it stopped. Returns, by digest, each tensor's buffer and range.
    /// With `into`, every part lands at its offset in that one block (an adapter's file).
    private func fetchTensors(_ tensors: [Manifest.Tensor], etag: String, query: String = "",
                              into target: ByteBlock? = nil) throws -> [String: (ByteBlock, Range<Int>)] {
        guard !tensors.isEmpty else { return [:] }
        let total = tensors.reduce(0) { $0 + $1.length }
        let laneCount = Self.lanes
        let most = max(1, (total + laneCount - 1) / laneCount)
        var parts: [[Manifest.Tensor]] = []
        for t in tensors.sorted(by: { $0.offset < $1.offset }) {
            if let last = parts.last?.last, last.offset + last.length == t.offset,
               parts[parts.count - 1].reduce(0, { $0 + $1.length }) + t.length <= most {
                parts[parts.count - 1].append(t)
            } else {
                parts.append([t])
            }
        }
        let jobs = parts.map { part in
            if let target { return PartDownload(tensors: part, into: target, origin: 0) }
            let length = part.last!.offset + part.last!.length - part[0].offset
            return recycledBlock(length, exact: false).map { PartDownload(tensors: part, into: $0, origin: part[0].offset) } ?? PartDownload(tensors: part)
        }
        // The larger parts first, each to the least loaded lane.
        let box = FollowerBox(follower: self), assigned = dealLargestFirst(jobs.map(\.length), into: laneCount)
        DispatchQueue.concurrentPerform(iterations: laneCount) { lane in
            for i in assigned[lane] where jobs[i].failure == nil { box.follower.run(jobs[i], etag: etag, query: query) }
        }
        if let f = jobs.compactMap(\.failure).first { throw f }
        var out: [String: (ByteBlock, Range<Int>)] = [:]
        if target != nil { return out }
        for j in jobs {
            let data = j.take()
            for t in j.tensors { out[t.sha256] = (data, (t.offset - j.lo)..<(t.offset - j.lo + t.length)) }
        }
        return out
    }

    /// Connections a sync downloads on (EMBER_SYNC_LANES, default 2).
    static let lanes = max(1, min(8, Int(ProcessInfo.processInfo.environment["EMBER_SYNC_LANES"] ?? "") ?? 2))

    /// One part: requests its remaining range until it is whole (at most 5 tries), hashing
    /// tensors as they complete.
    fileprivate func run(_ job: PartDownload, etag: String, query: String = "") {
        var attempts = 0
        while job.received < job.length {
            let start = job.lo + job.received
            var errorBody = Data()
            let r = HTTPClient.get(url + "/v1/weights" + query, headers: authHeaders + ["If-Match: \(etag)", "Range: bytes=\(start)-\(job.hi - 1)"],
                                   timeout: 600) { status, chunk in
                guard status == 206 else { if errorBody.count < 1024 { errorBody.append(contentsOf: chunk) }; return true }
                return job.accept(chunk)
            }
            if r.status == 412 { job.failure = FollowError.superseded; return }
            if let c = job.corrupt { job.failure = FollowError.corrupt("\(c) does not match its SHA-256"); return }
            if r.status != 206 && r.status != 0 {
                job.failure = FollowError.transport("\(url)/v1/weights answered \(r.status): \(String(decoding: errorBody.prefix(300), as: UTF8.self))")
                return
            }
            if job.received < job.length {
                attempts += 1
                guard attempts < 5 else {
                    job.failure = FollowError.transport("the download from \(url) broke off \(attempts) times: \(r.failure ?? "short body")")
                    return
                }
                logger.notice("weights download interrupted; resuming", metadata: ["received": "\(job.received)", "of": "\(job.length)",
                                                                                  "error": "\(r.failure ?? "short body")"])
                lock.lock(); errors += 1; lock.unlock()
            }
        }
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

/// A part of a download: contiguous tensors, their buffer, the bytes in, the tensors checked.
/// Sendable by hand: one lane's thread uses it at a time.
final class PartDownload: @unchecked Sendable {
    let tensors: [WeightFollower.Manifest.Tensor]
    let lo: Int, hi: Int
    var length: Int { hi - lo }
    private let buffer: UnsafeMutableRawPointer
    private var taken = false
    var received = 0
    /// Tensors whose hash is checked, and the bytes of the next one fed to `hasher` so far.
    private var checked = 0, hashed = 0
    private let hasher = SHA256.Streaming()
    var corrupt: String?
    var failure: Error?

    /// The part lands in a buffer of its own, or in `target` at its offset less `origin`.
    init(tensors: [WeightFollower.Manifest.Tensor], into target: ByteBlock? = nil, origin: Int = 0) {
        self.tensors = tensors
        self.lo = tensors[0].offset
        starts = tensors.map { $0.offset - tensors[0].offset }
        ends = tensors.map { $0.offset - tensors[0].offset + $0.length }
        let lo = tensors[0].offset, hi = tensors.last!.offset + tensors.last!.length
        self.hi = hi
        self.target = target
        self.origin = origin
        if let target { buffer = target.pointer + (lo - origin) } else { buffer = .allocate(byteCount: max(1, hi - lo), alignment: 64) }
    }
    private let target: ByteBlock?
    private let origin: Int
    /// Each tensor's first and end byte in the part.
    private let starts: [Int], ends: [Int]

    deinit { if !taken && target == nil { buffer.deallocate() } }

    /// Appends arrived bytes and feeds them to the hash of the tensor they belong to (so hashing
    /// keeps pace with the transfer); checks every tensor they complete. False (abort) on a
    /// mismatch or more bytes than asked for.
    func accept(_ chunk: UnsafeRawBufferPointer) -> Bool {
        guard received + chunk.count <= length else { corrupt = tensors.last!.name; return false }
        if let base = chunk.baseAddress { (buffer + received).copyMemory(from: base, byteCount: chunk.count) }
        received += chunk.count
        while checked < ends.count {
            let end = ends[checked]
            let upTo = min(received, end)
            if upTo > hashed { hasher.update(buffer + hashed, count: upTo - hashed); hashed = upTo }
            guard hashed == end else { break }
            guard hasher.finish() == tensors[checked].sha256 else { corrupt = tensors[checked].name; return false }
            checked += 1
            if checked < ends.count { hashed = starts[checked] }
        }
        return true
    }

    /// The whole part as a block of bytes, owning the buffer from here on.
    func take() -> ByteBlock {
        if let target { precondition(origin == lo, "a part written into a shared block is not taken"); return target }
        taken = true
        return ByteBlock(adopting: buffer, count: length)
    }
}

/// The follower, for the download lanes (its state is locked where they touch it).
struct FollowerBox: @unchecked Sendable { let follower: WeightFollower }
