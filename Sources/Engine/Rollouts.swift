// The rollout store: every generated sample is kept (tokens and sampling-time statistics) under a
// `rollout_id`, so `train_step` can refer to it instead of re-uploading it. Bounded by a memory
// budget: the least recently added rollouts are evicted first, and an evicted id is reported as
// such (not as unknown) for as long as the store remembers it.
import Foundation

public struct Rollout: Sendable {
    public let tokens: [Int32]
    public let responseStart: Int
    public let logprobs: [Float]
    public let proxyLogprobs: [Float]
    public let temperature: Float
    public let proxy: ProxySpec?
    public let weightsVersion: Int
    /// The LoRA adapter it was sampled under (nil: the base model).
    public let adapter: String?

    public init(tokens: [Int32], responseStart: Int, logprobs: [Float], proxyLogprobs: [Float],
                temperature: Float, proxy: ProxySpec?, weightsVersion: Int, adapter: String? = nil) {
        self.tokens = tokens; self.responseStart = responseStart; self.logprobs = logprobs
        self.proxyLogprobs = proxyLogprobs; self.temperature = temperature; self.proxy = proxy
        self.weightsVersion = weightsVersion; self.adapter = adapter
    }

    /// Bytes counted for a rollout beside its arrays.
    public static let fixedBytes = 96
    /// Approximate bytes held.
    public var byteCount: Int { Self.fixedBytes + tokens.count * 4 + logprobs.count * 4 + proxyLogprobs.count * 4 }
}

public enum RolloutError: Error, CustomStringConvertible, Equatable {
    case unknown(String)
    case evicted(String)

    public var description: String {
        switch self {
        case let .unknown(id): "rollout '\(id)' is unknown (never issued by this server, or released)"
        case let .evicted(id): "rollout '\(id)' was evicted to stay within the rollout memory budget; resend its tokens"
        }
    }
}

/// Not Sendable: one thread owns it (the server's compute thread, through the dispatcher).
public final class RolloutStore {
    public let budgetBytes: Int
    private var items: [String: Rollout] = [:]
    private var order: [String] = []          // insertion order (oldest first)
    private var head = 0
    private var evictedIds = Set<String>()
    private var evictedOrder: [String] = []
    private var next: UInt64 = 1
    private let prefix: String
    public private(set) var bytes = 0

    public init(budgetBytes: Int) {
        self.budgetBytes = budgetBytes
        prefix = String(UInt32.random(in: 0...UInt32.max), radix: 36)
    }

    public var count: Int { return items.count }
    /// Ids the eviction order still tracks (stored plus released ones not yet compacted away).
    public var trackedIds: Int { return order.count - head }

    /// Stores a rollout and returns its new id, evicting the oldest ones beyond the budget.
    public func add(_ r: Rollout) -> String {
        let id = "r-\(prefix)-\(next)"
        next += 1
        items[id] = r
        order.append(id)
        bytes += r.byteCount
        while bytes > budgetBytes, head < order.count {
            let old = order[head]
            head += 1
            if let gone = items.removeValue(forKey: old) {
                bytes -= gone.byteCount
                evictedIds.insert(old)
                evictedOrder.append(old)
                if evictedOrder.count > 1_000_000 { evictedIds.remove(evictedOrder.removeFirst()) }
            }
        }
        if head > 4096 && head * 2 > order.count { order.removeFirst(head); head = 0 }
        return id
    }

    public func get(_ id: String) throws -> Rollout {
        if let r = items[id] { return r }
        throw evictedIds.contains(id) ? RolloutError.evicted(id) : RolloutError.unknown(id)
    }

    /// Frees rollouts; returns how many were present.
    @discardableResult
    public func release(_ ids: [String]) -> Int {
        var n = 0
        for id in ids {
            if let r = items.removeValue(forKey: id) { bytes -= r.byteCount; n += 1 }
        }
        // Released ids stay in `order` until eviction passes them; drop them once they dominate
        // so a store that is released as it goes (and never evicts) does not grow.
        let live = order.count - head
        if live > 4096 && live > 2 * items.count {
            order = order[head...].filter { items[$0] != nil }
            head = 0
        }
        return n
    }
}
