// A trainer's weight publishing: `GET /v1/weights/manifest` and `GET /v1/weights`.
// A publication is the weights at one step boundary, copied into a safetensors image on the
// compute thread (a `read` job, so no step runs during the copy) and hashed off it, tensor by
// tensor. It is immutable: later steps build a new one, and a download in flight keeps its own
// alive, so a response never mixes two versions. Publications are built when asked for (a
// manifest request), and right after a change while a long poll waits; images whose weights did
// not change (the base while only an adapter trains) are reused, hashes included.
import Foundation
import Logging
import RPC
import Weights

/// One published version with its hashes and its manifest, ready to serve.
/// Sendable by hand: immutable after construction.
final class Publication: @unchecked Sendable {
    let weights: PublishedWeights
    let tensorHashes: [String]
    let adapterHashes: [String]
    /// Each adapter file's chunks with their SHA-256: a replica downloads them on parallel
    /// connections and checks each as it arrives.
    let adapterChunks: [[(offset: Int, length: Int, sha256: String)]]
    /// An adapter file's chunk size: about a sixteenth of it, in whole 4 KiB pages (so any
    /// adapter of more than 4 KiB has several).
    static func adapterChunk(_ n: Int) -> Int { max(4096, ((n + 15) / 16 + 4095) / 4096 * 4096) }
    /// Content-derived: equal ids, equal bytes (base and adapters).
    let id: String
    let manifest: Data

    init(_ w: PublishedWeights, reusing previous: Publication?) {
        weights = w
        if let previous, previous.weights.image === w.image {
            tensorHashes = previous.tensorHashes
        } else {
            let image = w.image, entries = image.entries
            let hashes = StringSlots(entries.count)
            DispatchQueue.concurrentPerform(iterations: entries.count) { i in
                hashes.set(i, SHA256.hex(image.bytes + entries[i].offset, count: entries[i].length))
            }
            tensorHashes = hashes.values
        }
        // Per adapter: the whole file's digest (its identity and ETag) and its chunks' digests,
        // all hashed in one parallel loop (the whole-file digest of each is one work item).
        var chunks: [[(offset: Int, length: Int, sha256: String)]] = []
        var whole: [String] = []
        var work: [(adapter: Int, chunk: Int)] = []   // chunk -1: the whole file
        for (k, a) in w.adapters.enumerated() {
            if let i = previous?.weights.adapters.firstIndex(where: { $0.image === a.image }) {
                whole.append(previous!.adapterHashes[i]); chunks.append(previous!.adapterChunks[i]); continue
            }
            let n = a.image.count
            chunks.append(stride(from: 0, to: max(n, 1), by: Self.adapterChunk(n)).map { ($0, min(Self.adapterChunk(n), n - $0), "") })
            whole.append("")
            work.append((k, -1))
            work += chunks[k].indices.map { (k, $0) }
        }
        if !work.isEmpty {
            let digests = StringSlots(work.count), images = w.adapters.map(\.image), spans = chunks, items = work
            DispatchQueue.concurrentPerform(iterations: items.count) { j in
                let (k, c) = items[j], image = images[k]
                digests.set(j, c < 0 ? SHA256.hex(image.bytes, count: image.count)
                                     : SHA256.hex(image.bytes + spans[k][c].offset, count: spans[k][c].length))
            }
            let values = digests.values
            for (j, (k, c)) in zip(work.indices, work) {
                if c < 0 { whole[k] = values[j] } else { chunks[k][c].sha256 = values[j] }
            }
        }
        adapterHashes = whole
        adapterChunks = chunks
        id = String(SHA256.hex(Data((["\(w.weightsVersion)"] + tensorHashes + w.adapters.map(\.name) + adapterHashes)
            .joined(separator: ",").utf8)).prefix(16))
        var tensors: [[String: Any]] = []
        for (e, h) in zip(w.image.entries, tensorHashes) {
            tensors.append(["name": e.name, "dtype": e.dtype.rawValue, "shape": e.shape, "offset": e.offset, "length": e.length, "sha256": h])
        }
        let wholeHashes = whole, chunkLists = chunks
        let adapters: [[String: Any]] = w.adapters.indices.map { i in
            let a = w.adapters[i], h = wholeHashes[i]
            let chunks: [[String: Any]] = chunkLists[i].map { ["offset": $0.offset, "length": $0.length, "sha256": $0.sha256] }
            return ["name": a.name, "weights_version": a.weightsVersion, "rank": a.config["r"] ?? NSNull(),
             "alpha": a.config["lora_alpha"] ?? NSNull(), "target_modules": a.config["target_modules"] ?? NSNull(),
             "use_rslora": a.config["use_rslora"] ?? false, "config": a.config, "length": a.image.count, "sha256": h, "chunks": chunks]
        }
        let body: [String: Any] = ["weights_version": w.weightsVersion, "manifest_id": id, "model": w.config,
                                   "dtype": w.image.entries.first?.dtype.rawValue ?? "F32", "length": w.image.count,
                                   "tensors": tensors, "adapters": adapters]
        manifest = (try? JSONSerialization.data(withJSONObject: body, options: [.sortedKeys])) ?? Data("{}".utf8)
    }

    var etag: String { "\"\(weights.weightsVersion)\"" }
}

/// Sendable by hand: state under `lock`; builds run on the scheduler's compute thread.
public final class WeightPublisher: @unchecked Sendable {
    let scheduler: Scheduler
    let logger: Logger
    private let lock = NSLock()
    private var current: Publication?
    /// Older publications still referenced by a download (If-Match may name them).
    private var older: [WeakPublication] = []
    private var building = false
    private var buildWaiters: [@Sendable (Result<Publication, Error>) -> Void] = []
    private var pollers: [Poller] = []
    private var latestKey = ""

    struct Poller {
        let id: Int
        let satisfied: @Sendable (Publication) -> Bool
        let answer: @Sendable (Publication?) -> Void
    }
    private var nextPoller = 0

    /// Publications built and bytes served (for /metrics).
    public private(set) var published = 0
    private var servedBytes = 0

    public init(scheduler: Scheduler, logger: Logger) {
        self.scheduler = scheduler
        self.logger = logger
        scheduler.setWeightsObserver { [weak self] key in self?.changed(key) }
        scheduler.onStop { [weak self] in self?.stop() }
    }

    /// The server is stopping: every long poll answers now (304).
    func stop() {
        lock.lock()
        let waiting = pollers
        pollers = []
        lock.unlock()
        for q in waiting { q.answer(nil) }
    }

    /// The compute thread saw the weights change: build at once if a long poll waits.
    private func changed(_ key: String) {
        lock.lock()
        latestKey = key
        let wanted = !pollers.isEmpty
        lock.unlock()
        if wanted { latest { _ in } }
    }

    /// The publication of the weights as they are now: the current one if nothing changed since,
    /// else a new one (built once however many ask at the same time).
    func latest(_ done: @escaping @Sendable (Result<Publication, Error>) -> Void) {
        lock.lock()
        buildWaiters.append(done)
        guard !building else { lock.unlock(); return }
        building = true
        let previous = current
        lock.unlock()
        scheduler.read({ d -> Any in
            if let previous, previous.weights.key == d.publicationKey { return previous }
            let t0 = Date()
            let w = try d.publishWeights(reusing: previous?.weights)
            self.logger.debug("weights copied", metadata: ["seconds": "\(String(format: "%.3f", Date().timeIntervalSince(t0)))"])
            return w
        }) { [self] raw in
            // Hashing runs off the compute thread.
            let box = JSONValue(try? raw.get())
            let failure: RPCError? = { if case let .failure(e) = raw { return e } else { return nil } }()
            DispatchQueue.global().async { [self] in
                let result: Result<Any, RPCError> = failure.map { .failure($0) } ?? .success(box.value as Any)
                let outcome: Result<Publication, Error>
                switch result {
                case let .success(p as Publication): outcome = .success(p)
                case let .success(w as PublishedWeights):
                    let t0 = Date()
                    let p = Publication(w, reusing: previous)
                    logger.info("weights published", metadata: ["weights_version": "\(w.weightsVersion)", "bytes": "\(w.image.count)",
                                                                "seconds": "\(String(format: "%.3f", Date().timeIntervalSince(t0)))"])
                    outcome = .success(p)
                case let .failure(e): outcome = .failure(e)
                default: outcome = .failure(RPCError.internalError("unexpected publication"))
                }
                lock.lock()
                if case let .success(p) = outcome, p !== current {
                    if let c = current { older.append(WeakPublication(c)) }
                    older.removeAll { $0.value == nil }
                    current = p
                    published += 1
                }
                let waiters = buildWaiters
                buildWaiters = []
                building = false
                var answered: [(Poller, Publication)] = []
                if case let .success(p) = outcome {
                    pollers.removeAll { q in
                        guard q.satisfied(p) else { return false }
                        answered.append((q, p)); return true
                    }
                }
                // Weights that changed while this one was built: build again for the pollers.
                let again = !pollers.isEmpty && (try? outcome.get())?.weights.key != latestKey && !latestKey.isEmpty
                lock.unlock()
                for w in waiters { w(outcome) }
                for (q, p) in answered { q.answer(p) }
                if again { latest { _ in } }
            }
        }
    }

    /// The manifest now, or (a long poll) once `satisfied` holds, or nil after `timeout` seconds.
    func manifest(timeout: Double, satisfied: @escaping @Sendable (Publication) -> Bool, answer: @escaping @Sendable (Result<Publication?, Error>) -> Void) {
        latest { [self] result in
            switch result {
            case let .failure(e): answer(.failure(e))
            case let .success(p):
                if satisfied(p) || timeout <= 0 { answer(.success(satisfied(p) ? p : nil)); return }
                lock.lock()
                // Changed while this request was being answered: the poller waits for the next build.
                let id = nextPoller; nextPoller += 1
                pollers.append(Poller(id: id, satisfied: satisfied, answer: { answer(.success($0)) }))
                let stale = current !== p || (!latestKey.isEmpty && latestKey != p.weights.key)
                lock.unlock()
                if stale { latest { _ in } }
                DispatchQueue.global().asyncAfter(deadline: .now() + timeout) { [self] in
                    lock.lock()
                    let i = pollers.firstIndex { $0.id == id }
                    let q = i.map { pollers.remove(at: $0) }
                    lock.unlock()
                    q?.answer(nil)
                }
            }
        }
    }

    /// The current publication, or an older one still alive, whose ETag is `etag`.
    func publication(etag: String) -> Publication? {
        lock.lock(); defer { lock.unlock() }
        if let c = current, c.etag == etag { return c }
        return older.lazy.compactMap(\.value).first { $0.etag == etag }
    }

    func served(_ bytes: Int) {
        lock.lock(); servedBytes += bytes; lock.unlock()
    }

    /// Figures for /metrics: publications built, bytes served, the current image's size.
    var figures: (published: Int, servedBytes: Int, imageBytes: Int) {
        lock.lock(); defer { lock.unlock() }
        return (published, servedBytes, current?.weights.image.count ?? 0)
    }
}

final class WeakPublication: @unchecked Sendable {
    weak var value: Publication?
    init(_ p: Publication) { value = p }
}
