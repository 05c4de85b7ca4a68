// Data-parallel training whose result does not depend on the number of ranks. A mini-batch is
// cut into L micro-batches (the leaves) that depend only on the batch, never on the rank count.
// Each leaf's gradient is computed on its own, and the mini-batch gradient is the sum of the
// leaves over one fixed binary tree (pairwise by leaf index). Ranks take contiguous runs of
// leaves; each rank sums the largest whole subtrees inside its run, and the subtrees meet over
// the same tree on every rank (the exchange, in `RankGroup.reduce`, moves bytes; every addition
// is Ember's). So R = 1, 2, 3, 4 ... give the same bits. MPI carries the bytes (Sources/Ranks).
import Foundation
import Kernels

/// The fixed summation tree over `leaves` leaves: a complete binary tree over the leaf indices
/// padded to a power of two; a node whose right half is past the last leaf is its left half.
public struct LeafTree: Sendable, Equatable {
    public let leaves: Int
    /// The padded width (a power of two >= leaves).
    public let span: Int

    /// An aligned range of leaf indices [lo, hi) in the padded tree.
    public struct Node: Hashable, Sendable {
        public let lo: Int, hi: Int
        public init(_ lo: Int, _ hi: Int) { self.lo = lo; self.hi = hi }
    }

    public init(leaves: Int) {
        precondition(leaves >= 1)
        self.leaves = leaves
        var s = 1
        while s < leaves { s <<= 1 }
        span = s
    }

    public var root: Node { Node(0, span) }

    /// The largest nodes whose leaves all lie in `block`, in leaf order (empty for an empty block).
    public func nodes(covering block: Range<Int>) -> [Node] {
        var out: [Node] = []
        func visit(_ lo: Int, _ hi: Int) {
            // A node wholly past the last leaf holds nothing (and lo..<leaves would be malformed).
            guard lo < leaves else { return }
            let e = lo..<min(hi, leaves)
            guard !e.isEmpty, e.overlaps(block) else { return }
            if e.lowerBound >= block.lowerBound && e.upperBound <= block.upperBound { out.append(Node(lo, hi)); return }
            let mid = (lo + hi) / 2
            visit(lo, mid)
            visit(mid, hi)
        }
        visit(0, span)
        return out
    }

    /// The value of `node`: a known value when `known` has one, a leaf's value at the bottom,
    /// else left + right (`add` returns the sum, typically written into its first argument).
    /// nil for a node wholly past the last leaf.
    public func evaluate<T>(_ node: Node, known: (Node) -> T? = { _ in nil }, leaf: (Int) throws -> T,
                            add: (T, T) throws -> T) throws -> T? {
        guard node.lo < leaves else { return nil }
        if let k = known(node) { return k }
        if node.hi - node.lo == 1 { return try leaf(node.lo) }
        let mid = (node.lo + node.hi) / 2
        guard let left = try evaluate(Node(node.lo, mid), known: known, leaf: leaf, add: add) else { return nil }
        guard let right = try evaluate(Node(mid, node.hi), known: known, leaf: leaf, add: add) else { return left }
        return try add(left, right)
    }

    /// Contiguous runs of leaves for `ranks` ranks (some empty when there are fewer leaves).
    public func blocks(ranks: Int) -> [Range<Int>] { evenParts(leaves, ranks) }
}

/// The ranks of one data-parallel trainer (MPI's world in the server; Sources/Ranks).
public protocol RankGroup: AnyObject {
    var rank: Int { get }
    var size: Int { get }
    /// Every rank's bytes, in rank order (a collective: every rank calls it).
    func allGather(_ bytes: [UInt8]) throws -> [[UInt8]]
    /// The tree's root over `count` floats into `out` on every rank. This rank holds the values of
    /// `tree.nodes(covering: blocks[rank])`, in that order (`local`; they may be overwritten).
    func reduce(tree: LeafTree, blocks: [Range<Int>], local: [UnsafeMutablePointer<Float>], count: Int,
                into out: UnsafeMutablePointer<Float>) throws
    /// Returns once every rank has called it (the step's commit point).
    func barrier() throws
}

/// One train_step's work as every rank runs it: the checked call (items as given, with what is
/// missing still missing: the ranks fill it in together) and the settings in force, so the
/// ranks need no other state.
public struct TrainCommand: Codable, Sendable {
    public var items: [TrainItem]
    /// The proxy for filling in missing proxy log-probabilities, and the rollout correction.
    public var proxy: ProxySpec?
    public var correction: RolloutCorrection
    public var config: LossConfig
    public var miniBatches: Int
    public var microBatchTokens: Int?
    public var dryRun: Bool
    /// The optimizer settings for this call (an override included) and the schedule.
    public var settings: AdamWSettings
    public var schedule: LRSchedule
    /// Rank 0's counters before the step; a rank whose own differ is out of step and refuses.
    public var weightsVersion: Int
    public var optimizerSteps: Int

    public init(items: [TrainItem], config: LossConfig, miniBatches: Int, microBatchTokens: Int?, dryRun: Bool,
                settings: AdamWSettings, schedule: LRSchedule, weightsVersion: Int, optimizerSteps: Int,
                proxy: ProxySpec? = nil, correction: RolloutCorrection = .none) {
        self.items = items; self.proxy = proxy; self.correction = correction
        self.config = config; self.miniBatches = miniBatches; self.microBatchTokens = microBatchTokens
        self.dryRun = dryRun; self.settings = settings; self.schedule = schedule
        self.weightsVersion = weightsVersion; self.optimizerSteps = optimizerSteps
    }

    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return e
    }()
    static let decoder: JSONDecoder = {
        let d = JSONDecoder()
        d.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return d
    }()
    /// JSON with exact floats (Swift prints the shortest text that reads back to the same bits).
    public func encoded() throws -> Data { try Self.encoder.encode(self) }
    public static func decode(_ data: Data) throws -> TrainCommand { try decoder.decode(TrainCommand.self, from: data) }
}

/// Gradient-sized float buffers kept between steps (fresh memory is slow to touch here, and a
/// step needs the same number again).
final class GradientPool {
    let count: Int
    private var free: [UnsafeMutablePointer<Float>] = []
    private(set) var allocated = 0
    init(count: Int) { self.count = count }
    func take() -> UnsafeMutablePointer<Float> {
        if let p = free.popLast() { return p }
        allocated += 1
        return UnsafeMutablePointer<Float>.allocate(capacity: max(1, count))
    }
    func give(_ p: UnsafeMutablePointer<Float>) { free.append(p) }
    deinit { for p in free { p.deallocate() } }
}

/// `n` items cut into `parts` contiguous runs whose lengths differ by at most one (some empty
/// when there are fewer items than parts): leaves among ranks, sequences among ranks, a
/// segment's chunks, mini-batches.
public func evenParts(_ n: Int, _ parts: Int) -> [Range<Int>] {
    (0..<parts).map { p in (n * p / parts)..<(n * (p + 1) / parts) }
}

/// Little-endian bytes for the ranks' small messages (floats by their bits).
public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public mutating func byte(_ b: UInt8) { bytes.append(b) }
    public mutating func int(_ v: Int) { withUnsafeBytes(of: Int64(v).littleEndian) { bytes += $0 } }
    public mutating func floats(_ v: [Float]) {
        int(v.count)
        for x in v { withUnsafeBytes(of: x.bitPattern.littleEndian) { bytes += $0 } }
    }
    public mutating func doubles(_ v: [Double]) {
        int(v.count)
        for x in v { withUnsafeBytes(of: x.bitPattern.littleEndian) { bytes += $0 } }
    }
    public mutating func bools(_ v: [Bool]) { int(v.count); bytes += v.map { $0 ? 1 : 0 } }
    public mutating func text(_ s: String) { let u = Array(s.utf8); int(u.count); bytes += u }
}

public struct ByteReader {
    public struct Truncated: Error, CustomStringConvertible {
        public var description: String { "a message between ranks ended early" }
    }
    let bytes: [UInt8]
    var at = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    mutating func take(_ n: Int) throws -> ArraySlice<UInt8> {
        guard n >= 0, at + n <= bytes.count else { throw Truncated() }
        defer { at += n }
        return bytes[at..<(at + n)]
    }
    public mutating func byte() throws -> UInt8 { try take(1).first! }
    public mutating func int() throws -> Int {
        var v: UInt64 = 0
        for (k, b) in try take(8).enumerated() { v |= UInt64(b) << (8 * UInt64(k)) }
        return Int(Int64(bitPattern: v))
    }
    private mutating func word32() throws -> UInt32 {
        var v: UInt32 = 0
        for (k, b) in try take(4).enumerated() { v |= UInt32(b) << (8 * UInt32(k)) }
        return v
    }
    private mutating func word64() throws -> UInt64 {
        var v: UInt64 = 0
        for (k, b) in try take(8).enumerated() { v |= UInt64(b) << (8 * UInt64(k)) }
        return v
    }
    public mutating func floats() throws -> [Float] { try (0..<int()).map { _ in Float(bitPattern: try word32()) } }
    public mutating func doubles() throws -> [Double] { try (0..<int()).map { _ in Double(bitPattern: try word64()) } }
    public mutating func bools() throws -> [Bool] { try take(int()).map { $0 != 0 } }
    public mutating func text() throws -> String { String(decoding: try take(int()), as: UTF8.self) }
}
