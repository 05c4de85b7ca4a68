// The ranks of a data-parallel trainer over Open MPI (loaded only under mpirun; Sources/CMPI).
// MPI moves the bytes: non-blocking all-to-all and all-gather carry gradient chunks, point-to-
// point messages carry commands and small per-rank values. The arithmetic of the gradient sum
// is Ember's, over the fixed tree of `LeafTree`, so the result does not depend on the number of
// ranks.
//
// Faults: every wait polls with a deadline instead of blocking. Each rank sends a heartbeat to
// every other rank once a second from its own thread, so a peer that dies or hangs (stopped,
// wedged) goes silent; a rank silent for `timeout` seconds fails the collective in progress on
// every rank that waits for it. A failed world stays failed: rank 0 keeps serving what needs no
// peer and reports itself degraded; the other ranks leave. Restarting the job resumes from the
// last checkpoint.
import CMPI
import Engine
import Foundation
import Kernels

/// A NUL-terminated C string in a buffer.
func text(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

public struct RankFailure: Error, CustomStringConvertible {
    public let reason: String
    public var description: String { reason }
}

public final class MPIWorld: RankGroup, @unchecked Sendable {
    public let rank: Int
    public let size: Int
    /// Each rank's host (MPI's processor name), by rank.
    public private(set) var hosts: [String] = []
    /// Seconds a peer may stay silent before it counts as dead or hung.
    public let timeout: Double

    private let lock = NSLock()
    private var lastSeen: [Double]
    private var failed: String?
    private var stopRequested = false
    private var heartbeats = true
    private var heartbeatThread: Thread?
    private var closing = false
    private let heartbeatDone = DispatchSemaphore(value: 0)

    enum Tag: Int32 { case command = 1, payload = 2, heartbeat = 3, stop = 4, gatherLength = 5, gather = 6 }

    /// Floats per exchange segment (bounds the receive buffers and keeps MPI's int counts small).
    /// EMBER_DP_SEGMENT_FLOATS changes it (the tests make many small segments of a tiny model).
    /// Every rank must cut the same way: rank 0's value reaches the others with the model.
    public internal(set) var segment = Int(ProcessInfo.processInfo.environment["EMBER_DP_SEGMENT_FLOATS"] ?? "").flatMap { $0 > 0 ? $0 : nil } ?? 1 << 24
    /// Command payloads travel in pieces of at most this many floats (MPI counts are ints).
    static let piece = 1 << 24

    /// [0, count) in consecutive ranges of at most `size` elements.
    static func pieces(_ count: Int, of size: Int = piece) -> [Range<Int>] {
        stride(from: 0, to: count, by: size).map { $0..<min($0 + size, count) }
    }

    /// The world when this process was started by Open MPI's mpirun (nil otherwise).
    public static func fromEnvironment(timeout: Double) throws -> MPIWorld? {
        let env = ProcessInfo.processInfo.environment
        guard env["OMPI_COMM_WORLD_SIZE"] != nil else { return nil }
        var err = [CChar](repeating: 0, count: 512)
        guard ember_mpi_load(&err, err.count) == 0 else {
            throw RankFailure(reason: text(err) + " (install Open MPI: scripts/setup does)")
        }
        var rank: Int32 = 0, size: Int32 = 0, multiple: Int32 = 0
        let rc = ember_mpi_init(&rank, &size, &multiple)
        guard rc == 0 else { throw RankFailure(reason: "MPI_Init_thread failed (error \(rc))") }
        guard multiple != 0 else { throw RankFailure(reason: "this Open MPI was built without MPI_THREAD_MULTIPLE, which the heartbeats need") }
        let world = MPIWorld(rank: Int(rank), size: Int(size), timeout: timeout)
        try world.start()
        return world
    }

    /// Ranks on this host.
    public static var localSize: Int {
        Int(ProcessInfo.processInfo.environment["OMPI_COMM_WORLD_LOCAL_SIZE"] ?? "") ?? 1
    }

    /// The default compute threads of a rank: the CPUs it may run on (mpirun binds a rank to one
    /// core by default when there are at most two ranks; `--bind-to none` lifts that), at most
    /// this host's CPUs shared among its ranks.
    public static var defaultThreads: Int {
        let cores = ProcessInfo.processInfo.activeProcessorCount
        let affinity = Int(ember_cpu_affinity_count())
        let allowed = affinity > 0 ? affinity : cores
        return max(1, min(allowed, cores / max(1, localSize)))
    }

    private init(rank: Int, size: Int, timeout: Double) {
        self.rank = rank
        self.size = size
        self.timeout = timeout
        lastSeen = Array(repeating: Self.now(), count: size)
    }

    private func start() throws {
        let t = Thread { [unowned self] in self.heartbeatLoop() }
        t.name = "ember-heartbeat"
        heartbeatThread = t
        t.start()
        var name = [CChar](repeating: 0, count: 512)
        _ = ember_mpi_processor_name(&name, Int32(name.count))
        hosts = try allGather(Array(text(name).utf8)).map { String(decoding: $0, as: UTF8.self) }
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }

    /// Why the world failed, once it has (it never recovers).
    public var failure: String? { lock.withLock { failed } }

    /// Marks the world failed. Rank 0 tells the others to leave (best effort) and stops its
    /// heartbeats, so a rank that missed the message leaves when rank 0 falls silent.
    @discardableResult
    public func fail(_ reason: String) -> RankFailure {
        let first: Bool = lock.withLock {
            if failed != nil { return false }
            failed = reason
            heartbeats = false
            pinnedKeepAll = true
            return true
        }
        if first && rank == 0 {
            for p in 1..<max(1, size) {
                var r: ember_mpi_request?
                if ember_mpi_isend(Self.stopByte, 1, 0, Int32(p), Tag.stop.rawValue, &r) == 0 { _ = ember_mpi_request_free(&r) }
            }
        }
        return RankFailure(reason: lock.withLock { failed! })
    }

    nonisolated(unsafe) private static let stopByte: UnsafeMutablePointer<UInt8> = {
        let p = UnsafeMutablePointer<UInt8>.allocate(capacity: 1); p.pointee = 0; return p
    }()
    nonisolated(unsafe) private static let heartbeatByte: UnsafeMutablePointer<UInt8> = {
        let p = UnsafeMutablePointer<UInt8>.allocate(capacity: 1); p.pointee = 1; return p
    }()

    private func heartbeatLoop() {
        let interval = min(1.0, timeout / 4)
        let sink = UnsafeMutablePointer<UInt8>.allocate(capacity: 1)
        var lastSent = 0.0
        defer { heartbeatDone.signal() }
        while true {
            let (beating, done) = lock.withLock { (heartbeats, closing || (failed != nil && rank != 0)) }
            if done { return }
            let t = Self.now()
            if beating && t - lastSent >= interval {
                lastSent = t
                for p in 0..<size where p != rank {
                    var r: ember_mpi_request?
                    if ember_mpi_isend(Self.heartbeatByte, 1, 0, Int32(p), Tag.heartbeat.rawValue, &r) == 0 { _ = ember_mpi_request_free(&r) }
                }
            }
            for p in 0..<size where p != rank {
                var flag: Int32 = 0
                while ember_mpi_iprobe(Int32(p), Tag.heartbeat.rawValue, &flag) == 0 && flag != 0 {
                    var r: ember_mpi_request?
                    guard ember_mpi_irecv(sink, 1, 0, Int32(p), Tag.heartbeat.rawValue, &r) == 0 else { break }
                    var done: Int32 = 0
                    while ember_mpi_testall(1, &r, &done) == 0 && done == 0 { usleep(10) }
                    let seen = Self.now()
                    lock.withLock { lastSeen[p] = seen }
                    flag = 0
                }
            }
            if rank != 0 {
                var flag: Int32 = 0
                if ember_mpi_iprobe(0, Tag.stop.rawValue, &flag) == 0 && flag != 0 { lock.withLock { stopRequested = true } }
            }
            usleep(20_000)
        }
    }

    /// Throws when the world has failed, a peer has been silent too long, or (on the other
    /// ranks) rank 0 has stopped the job.
    func checkPeers(_ what: String) throws {
        let (reason, silent, stop): (String?, (Int, Double)?, Bool) = lock.withLock {
            let t = Self.now()
            var worst: (Int, Double)?
            for p in 0..<size where p != rank && t - lastSeen[p] > timeout {
                if worst == nil || t - lastSeen[p] > worst!.1 { worst = (p, t - lastSeen[p]) }
            }
            return (failed, worst, stopRequested)
        }
        if let reason { throw RankFailure(reason: reason) }
        if stop { throw fail("rank 0 stopped the job") }
        if let (p, s) = silent {
            throw fail(String(format: "rank %d (%@) has been silent for %.0f s (dead or hung; --dp-timeout %.0f) while %@",
                              p, p < hosts.count ? hosts[p] : "?", s, timeout, what))
        }
    }

    /// Waits for every request, polling; throws (and fails the world) on an MPI error, a silent
    /// peer or a stop. The buffers of unfinished requests must then stay allocated.
    func wait(_ requests: inout [ember_mpi_request?], _ what: String, limit: Double? = nil) throws {
        let start = Self.now()
        var checked = start
        try checkPeers(what)
        while true {
            var done: Int32 = 0
            let rc = requests.withUnsafeMutableBufferPointer { ember_mpi_testall(Int32($0.count), $0.baseAddress, &done) }
            if rc != 0 { throw fail("MPI error \(rc) while \(what)") }
            if done != 0 { return }
            let t = Self.now()
            if t - checked > 0.01 {
                checked = t
                try checkPeers(what)
                if let limit, t - start > limit { throw fail("\(what) took longer than \(limit) s") }
            }
            // Spin for the first 2 ms (a peer's answer is usually that close), then poll gently.
            if t - start > 0.002 { usleep(t - start > 1 ? 1000 : 50) }
        }
    }

    // MARK: - RankGroup

    public func allGather(_ bytes: [UInt8]) throws -> [[UInt8]] {
        try checkPeers("gathering")
        if size == 1 { return [bytes] }
        let mine = Pinned(bytes)
        let myLength = Pinned([Int64(bytes.count)])
        let lengths = Pinned([Int64](repeating: 0, count: size))
        var requests: [ember_mpi_request?] = []
        for p in 0..<size where p != rank {
            var s: ember_mpi_request?, r: ember_mpi_request?
            try check(ember_mpi_isend(myLength.raw, 8, 0, Int32(p), Tag.gatherLength.rawValue, &s), "sending a length")
            try check(ember_mpi_irecv(lengths.raw + 8 * p, 8, 0, Int32(p), Tag.gatherLength.rawValue, &r), "receiving a length")
            requests += [s, r]
        }
        try wait(&requests, "gathering lengths")
        var incoming: [Int: Pinned<UInt8>] = [:]
        requests = []
        for p in 0..<size where p != rank {
            let n = Int(lengths.pointer[p])
            guard n >= 0, n < Int(Int32.max) else { throw fail("rank \(p) sent a bad length \(n)") }
            let buffer = Pinned([UInt8](repeating: 0, count: n))
            incoming[p] = buffer
            var s: ember_mpi_request?, r: ember_mpi_request?
            try check(ember_mpi_isend(mine.raw, Int32(bytes.count), 0, Int32(p), Tag.gather.rawValue, &s), "sending")
            try check(ember_mpi_irecv(buffer.raw, Int32(n), 0, Int32(p), Tag.gather.rawValue, &r), "receiving")
            requests += [s, r]
        }
        try wait(&requests, "gathering")
        return (0..<size).map { $0 == rank ? bytes : incoming[$0]!.array }
    }

    public func barrier() throws {
        try checkPeers("committing")
        if size == 1 { return }
        var r: ember_mpi_request?
        try check(ember_mpi_ibarrier(&r), "entering the barrier")
        var requests = [r]
        try wait(&requests, "waiting for every rank at the commit barrier")
    }

    /// Receive buffers of the exchange, kept between steps.
    private var receiveArea: UnsafeMutablePointer<Float>?
    private var receiveCapacity = 0

    public func reduce(tree: LeafTree, blocks: [Range<Int>], local: [UnsafeMutablePointer<Float>], count: Int,
                       into out: UnsafeMutablePointer<Float>) throws {
        try checkPeers("reducing gradients")
        let nodesOf = blocks.map { tree.nodes(covering: $0) }
        precondition(nodesOf[rank].count == local.count, "local values do not match this rank's nodes")
        if size == 1 {
            out.update(from: local[0], count: count)
            return
        }
        let R = size
        let rounds = nodesOf.map(\.count).max() ?? 0
        let segment = self.segment
        let maxChunk = (min(segment, count) + R - 1) / R + 1
        let slot = rounds * R * maxChunk
        // Two receive slots: segment s+1's data arrives while segment s is added up.
        let needed = max(1, 2 * slot)
        if receiveCapacity < needed {
            receiveArea?.deallocate()
            receiveArea = .allocate(capacity: needed)
            receiveCapacity = needed
        }
        let area = receiveArea!
        let segments = Self.pieces(count, of: segment)
        var pinned: [AnyObject] = []
        // Chunk d of a segment is rank d's to add up; counts and offsets as MPI takes them.
        let chunks = segments.map { evenParts($0.count, R) }
        let chunkCounts = chunks.map { Pinned($0.map { Int32($0.count) }) }
        let chunkDispls = chunks.map { Pinned($0.map { Int32($0.lowerBound) }) }
        let none = Pinned([Int32](repeating: 0, count: R))
        pinned += chunkCounts + chunkDispls + [none]
        /// Reduce-scatter's data movement for one segment: round k carries every rank's k-th node,
        /// chunk d to rank d, into receive slot `s % 2`.
        func post(_ s: Int) throws -> [ember_mpi_request?] {
            let seg = segments[s], c = chunks[s][rank].count
            // A rank's own chunk stays where it is (nothing to self).
            let counts = Pinned(chunks[s].enumerated().map { Int32($0.offset == rank ? 0 : $0.element.count) })
            let displs = chunkDispls[s]
            let recvDispls = Pinned((0..<R).map { Int32($0 * c) })
            pinned += [counts, recvDispls]
            var requests: [ember_mpi_request?] = []
            for k in 0..<rounds {
                let have = nodesOf[rank].count > k
                let recvCounts = Pinned((0..<R).map { Int32($0 != rank && nodesOf[$0].count > k ? c : 0) })
                pinned.append(recvCounts)
                var r: ember_mpi_request?
                try check(ember_mpi_ialltoallv(have ? local[k] + seg.lowerBound : out + seg.lowerBound, have ? counts.pointer : none.pointer,
                                               displs.pointer, area + (s % 2) * slot + k * R * maxChunk, recvCounts.pointer,
                                               recvDispls.pointer, &r), "exchanging gradients")
                requests.append(r)
            }
            return requests
        }
        var incoming = try post(0)
        var gathers: [ember_mpi_request?] = []
        for (s, seg) in segments.enumerated() {
            try wait(&incoming, "exchanging gradients")
            if s + 1 < segments.count { incoming = try post(s + 1) }
            let mine = chunks[s][rank], c = mine.count
            var known: [LeafTree.Node: UnsafeMutablePointer<Float>] = [:]
            for q in 0..<R {
                for (k, node) in nodesOf[q].enumerated() {
                    known[node] = q == rank ? local[k] + seg.lowerBound + mine.lowerBound : area + (s % 2) * slot + k * R * maxChunk + q * c
                }
            }
            if c > 0 {
                let root = try tree.evaluate(tree.root, known: { known[$0] }, leaf: { j in
                    throw RankFailure(reason: "leaf \(j) is on no rank")
                }, add: { a, b in addInPlace(a, b, count: c); return a })!
                (out + seg.lowerBound + mine.lowerBound).update(from: root, count: c)
            }
            // All-gather: every rank's reduced chunk to every rank (waited for at the end).
            var r: ember_mpi_request?
            try check(ember_mpi_iallgatherv(out + seg.lowerBound, chunkCounts[s].pointer, chunkDispls[s].pointer, &r), "gathering gradients")
            gathers.append(r)
            // Let earlier gathers move while the next segment arrives.
            var done: Int32 = 0
            _ = gathers.withUnsafeMutableBufferPointer { ember_mpi_testall(Int32($0.count), $0.baseAddress, &done) }
        }
        try wait(&gathers, "gathering gradients")
        withExtendedLifetime(pinned) {}
    }

    private func check(_ rc: Int32, _ what: String) throws {
        if rc != 0 { throw fail("MPI error \(rc) while \(what)") }
    }

    /// Open MPI's own all-reduce (MPI_SUM, its order of additions), in place, in segments: the
    /// benchmark's anchor for `reduce`. Blocking, so not for the trainer.
    public func nativeAllReduce(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws {
        for piece in Self.pieces(count) {
            try check(ember_mpi_allreduce_sum(buffer + piece.lowerBound, Int32(piece.count)), "MPI_Allreduce")
        }
    }

    // MARK: - Commands from rank 0

    /// Rank 0: sends a command and its float arrays to every other rank.
    public func send(command: Data, arrays: [(UnsafePointer<Float>, Int)], limit: Double? = nil) throws {
        precondition(rank == 0)
        try checkPeers("sending a command")
        if size == 1 { return }
        let header = Pinned(Array(command))
        let length = Pinned([Int64(command.count)])
        var requests: [ember_mpi_request?] = []
        for p in 1..<size {
            var a: ember_mpi_request?, b: ember_mpi_request?
            try check(ember_mpi_isend(length.raw, 8, 0, Int32(p), Tag.command.rawValue, &a), "sending a command")
            try check(ember_mpi_isend(header.raw, Int32(command.count), 0, Int32(p), Tag.command.rawValue, &b), "sending a command")
            requests += [a, b]
            for (pointer, count) in arrays {
                for piece in Self.pieces(count) {
                    var r: ember_mpi_request?
                    try check(ember_mpi_isend(pointer + piece.lowerBound, Int32(piece.count), 1, Int32(p), Tag.payload.rawValue, &r),
                              "sending weights")
                    requests.append(r)
                }
            }
        }
        try wait(&requests, "sending a command to the ranks", limit: limit)
    }

    /// The other ranks: waits (idle, polling gently) for rank 0's next command.
    public func receiveCommand() throws -> Data {
        precondition(rank != 0)
        while true {
            var flag: Int32 = 0
            try check(ember_mpi_iprobe(0, Tag.command.rawValue, &flag), "waiting for a command")
            if flag != 0 { break }
            try checkPeers("waiting for a command")
            usleep(2000)
        }
        let length = Pinned([Int64(0)])
        var r: ember_mpi_request?
        try check(ember_mpi_irecv(length.raw, 8, 0, 0, Tag.command.rawValue, &r), "receiving a command")
        var requests = [r]
        try wait(&requests, "receiving a command")
        let n = Int(length.pointer[0])
        let body = Pinned([UInt8](repeating: 0, count: n))
        try check(ember_mpi_irecv(body.raw, Int32(n), 0, 0, Tag.command.rawValue, &r), "receiving a command")
        requests = [r]
        try wait(&requests, "receiving a command")
        return Data(body.array)
    }

    /// The other ranks: receives a float array of a command into `pointer`.
    public func receive(into pointer: UnsafeMutablePointer<Float>, count: Int) throws {
        var requests: [ember_mpi_request?] = []
        for piece in Self.pieces(count) {
            var r: ember_mpi_request?
            try check(ember_mpi_irecv(pointer + piece.lowerBound, Int32(piece.count), 1, 0, Tag.payload.rawValue, &r), "receiving weights")
            requests.append(r)
        }
        try wait(&requests, "receiving weights")
    }

    /// A clean end: MPI_Finalize unless the world failed (then peers may be gone and it could hang).
    public func finish() {
        let (ok, first): (Bool, Bool) = lock.withLock {
            defer { heartbeats = false; closing = true }
            return (failed == nil, !closing)
        }
        guard first else { return }
        // No MPI call from the heartbeat thread may follow MPI_Finalize.
        if heartbeatThread != nil { heartbeatDone.wait() }
        if ok { _ = ember_mpi_finalize() }
    }
}

/// After a failure MPI may still write into buffers of requests that never finished: from then
/// on they are never freed.
nonisolated(unsafe) var pinnedKeepAll = false

/// A copy of an array at a fixed address, for MPI requests that outlive a Swift scope.
final class Pinned<T> {
    let pointer: UnsafeMutablePointer<T>
    let count: Int
    init(_ values: [T]) {
        count = values.count
        pointer = .allocate(capacity: max(1, values.count))
        values.withUnsafeBufferPointer { if let b = $0.baseAddress { pointer.initialize(from: b, count: values.count) } }
    }
    var raw: UnsafeMutableRawPointer { UnsafeMutableRawPointer(pointer) }
    var array: [T] { Array(UnsafeBufferPointer(start: pointer, count: count)) }
    deinit {
        if pinnedKeepAll { return }
        pointer.deinitialize(count: count); pointer.deallocate()
    }
}
