// Token (and learned position) embeddings.

/// out[T, C] = table[ids[t]] (+ positionTable[positions[t]] when given).
public func embeddingForward(_ out: UnsafeMutablePointer<Float>, ids: UnsafePointer<Int32>,
                             table: UnsafePointer<Float>, positions: UnsafePointer<Int32>?,
                             positionTable: UnsafePointer<Float>?, rows: Int, channels C: Int) {
    parallelFor(rows, minPerThread: 64) { t in
        let o = out + t * C
        o.update(from: table + Int(ids[t]) * C, count: C)
        if let positions, let positionTable {
            let p = positionTable + Int(positions[t]) * C
            for c in 0..<C { o[c] += p[c] }
        }
    }
}

/// dTable[ids[t]] += dOut[t] (and the same for positions), in token order.
public func embeddingBackward(_ dTable: UnsafeMutablePointer<Float>, _ dOut: UnsafePointer<Float>,
                              ids: UnsafePointer<Int32>, rows: Int, channels C: Int) {
    for t in 0..<rows {
        let d = dTable + Int(ids[t]) * C, g = dOut + t * C
        for c in 0..<C { d[c] += g[c] }
    }
}
