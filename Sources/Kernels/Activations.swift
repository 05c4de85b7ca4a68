// MLP activations: SwiGLU (Llama family) and GELU with tanh approximation (GPT-2).
import Foundation

// MARK: - SwiGLU

/// h[T, I] = silu(gate) · up, with gateUp[T, 2I] = [gate | up] per row.
public func swigluForward(_ h: UnsafeMutablePointer<Float>, _ gateUp: UnsafePointer<Float>,
                          rows: Int, intermediate I: Int) {
    let table = Kernels.table
    parallelFor(rows, minPerThread: 32) { t in
        let g = gateUp + t * 2 * I
        table.pointee.swiglu_forward(h + t * I, g, g + I, I)
    }
}

/// Backward of `swigluForward`: dGateUp[T, 2I] overwritten.
public func swigluBackward(_ dGateUp: UnsafeMutablePointer<Float>, _ dh: UnsafePointer<Float>,
                           _ gateUp: UnsafePointer<Float>, rows: Int, intermediate I: Int) {
    let table = Kernels.table
    parallelFor(rows, minPerThread: 32) { t in
        let g = gateUp + t * 2 * I, dg = dGateUp + t * 2 * I
        table.pointee.swiglu_backward(dg, dg + I, dh + t * I, g, g + I, I)
    }
}

// MARK: - GELU (tanh approximation, "gelu_new")

private let geluScale: Float = 0.7978845608028654   // sqrt(2/pi)

/// out[n] = 0.5 x (1 + tanh(sqrt(2/π)(x + 0.044715 x³))). Safe in place.
public func geluForward(_ out: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, count: Int) {
    parallelRanges(count, minPerThread: 4096) { _, lo, hi in
        for i in lo..<hi {
            let v = x[i]
            out[i] = 0.5 * v * (1 + tanhf(geluScale * (v + 0.044715 * v * v * v)))
        }
    }
}

/// Backward of `geluForward`: dx overwritten.
public func geluBackward(_ dx: UnsafeMutablePointer<Float>, _ dOut: UnsafePointer<Float>,
                         _ x: UnsafePointer<Float>, count: Int) {
    parallelRanges(count, minPerThread: 4096) { _, lo, hi in
        for i in lo..<hi {
            let v = x[i]
            let u = geluScale * (v + 0.044715 * v * v * v)
            let th = tanhf(u)
            let sech2 = 1 - th * th
            let du = geluScale * (1 + 3 * 0.044715 * v * v)
            dx[i] = dOut[i] * (0.5 * (1 + th) + 0.5 * v * sech2 * du)
        }
    }
}

// MARK: - Residual

/// a[n] += b[n].
public func addInPlace(_ a: UnsafeMutablePointer<Float>, _ b: UnsafePointer<Float>, count: Int) {
    parallelRanges(count, minPerThread: 8192) { _, lo, hi in
        for i in lo..<hi { a[i] += b[i] }
    }
}
