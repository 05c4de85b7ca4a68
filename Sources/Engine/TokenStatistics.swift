// Per-position statistics of a next-token distribution, shared by sampling, scoring and the
// training losses so that all three see identical numbers for the same logits row:
// log-probability of a token under the full softmax at a temperature, entropy, Lp-Reg's proxy
// log-probability, and the top alternatives.
import Foundation
import Kernels

/// Lp-Reg's proxy distribution (docs: shared lp-reg.md): keep tokens with p >= kappa·p_max
/// (min-p form) or p >= tau (fixed form), renormalize over the kept tokens.
public enum ProxySpec: Sendable, Equatable, Codable {
    case minP(Float)
    case threshold(Float)
}

/// The distribution softmax(logits / T) of one row, prepared once and queried many times.
/// `temperature` 0 means greedy sampling; its statistics are reported at temperature 1.
public struct RowDistribution {
    /// Scaled logits z = logits / T (points into caller storage).
    public let z: UnsafeMutablePointer<Float>
    public let count: Int
    /// log Σ exp(z).
    public let lse: Float

    /// Scales `logits` in place by 1/T and computes the log-sum-exp.
    public init(scaling logits: UnsafeMutablePointer<Float>, count: Int, temperature: Float) {
        if temperature > 0 && temperature != 1 {
            let inv = 1 / temperature
            for i in 0..<count { logits[i] *= inv }
        }
        z = logits
        self.count = count
        lse = logSumExp(logits, count)
    }

    /// log p(token).
    @inline(__always)
    public func logprob(_ token: Int) -> Float { z[token] - lse }

    /// H = Σ p·(lse − z), with p = exp(z − lse): non-negative terms, summed in 8 lanes.
    public func entropy() -> Float {
        var acc = SIMD8<Float>()
        let shift = SIMD8<Float>(repeating: lse)
        var i = 0
        while i + 8 <= count {
            let v = UnsafeRawPointer(z + i).loadUnaligned(as: SIMD8<Float>.self)
            let e = exp8(v - shift)
            var term = e * (shift - v)
            term.replace(with: 0, where: e .== 0)   // exp underflow times an infinite gap
            acc += term
            i += 8
        }
        var tail: Float = 0
        while i < count {
            let e = exp1(z[i] - lse)
            if e > 0 { tail += e * (lse - z[i]) }
            i += 1
        }
        return acc.sum() + tail
    }

    /// The proxy's kept set in z-space: tokens with z >= the returned cut.
    func proxyCut(_ spec: ProxySpec) -> Float {
        switch spec {
        case let .minP(kappa): maxElement(z, count) + logf(max(kappa, .leastNonzeroMagnitude))
        case let .threshold(tau): lse + logf(max(tau, .leastNonzeroMagnitude))
        }
    }

    /// The proxy's view of this row: whether it keeps `token`, and the probability mass of the
    /// tokens it drops as noise (under this distribution).
    public func proxyFilter(_ token: Int, _ spec: ProxySpec) -> (keeps: Bool, noiseMass: Float) {
        let cut = proxyCut(spec)
        return (z[token] >= cut, expSum(minus: lse, keeping: cut, below: true))
    }

    /// Log-probability of `token` under the proxy distribution; −infinity when the filter drops it.
    public func proxyLogprob(_ token: Int, _ spec: ProxySpec) -> Float {
        let cut = proxyCut(spec)
        if z[token] < cut { return -.infinity }
        // Log-sum-exp over kept tokens, in the same fixed order as logSumExp.
        let m = maxElement(z, count)
        return z[token] - (m + logf(expSum(minus: m, keeping: cut, below: false)))
    }

    /// Σ exp(z − shift) over the tokens with z < cut (`below`) or z ≥ cut, summed in 8 lanes and
    /// then the tail, a fixed order whatever the row.
    func expSum(minus shift: Float, keeping cut: Float, below: Bool) -> Float {
        var acc = SIMD8<Float>()
        let s = SIMD8<Float>(repeating: shift), c = SIMD8<Float>(repeating: cut)
        var i = 0
        while i + 8 <= count {
            let v = UnsafeRawPointer(z + i).loadUnaligned(as: SIMD8<Float>.self)
            var e = exp8(v - s)
            e.replace(with: 0, where: below ? v .>= c : v .< c)
            acc += e
            i += 8
        }
        var tail: Float = 0
        while i < count { if (z[i] < cut) == below { tail += exp1(z[i] - shift) }; i += 1 }
        return acc.sum() + tail
    }

    /// The k most likely tokens with their log-probabilities (ties: lower id first).
    public func top(_ k: Int) -> [(token: Int32, logprob: Float)] {
        guard k > 0 else { return [] }
        var best: [(Int32, Float)] = []
        best.reserveCapacity(k + 1)
        for i in 0..<count {
            let v = z[i]
            if best.count == k, let last = best.last, !(v > last.1) { continue }
            var pos = best.count
            while pos > 0 && v > best[pos - 1].1 { pos -= 1 }
            best.insert((Int32(i), v), at: pos)
            if best.count > k { best.removeLast() }
        }
        return best.map { ($0.0, $0.1 - lse) }
    }
}
