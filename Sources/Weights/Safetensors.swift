// Safetensors: an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then raw data.
// Spec: huggingface/safetensors README. Files are memory-mapped read-only.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// Errors from reading or writing weights; each names the file and, where there is one, the tensor.
public enum WeightsError: Error, CustomStringConvertible, Equatable {
    case cannotOpen(path: String, reason: String)
    case truncated(path: String, reason: String)
    case malformedHeader(path: String, reason: String)
    case malformedTensor(path: String, tensor: String, reason: String)
    case unsupportedDType(path: String, tensor: String, dtype: String)
    case missingTensor(tensor: String, searched: String)
    case shapeMismatch(tensor: String, expected: [Int], found: [Int])
    case writeFailed(path: String, reason: String)

    public var description: String {
        switch self {
        case let .cannotOpen(p, r): "cannot open \(p): \(r)"
        case let .truncated(p, r): "\(p) is truncated: \(r)"
        case let .malformedHeader(p, r): "\(p) has a malformed safetensors header: \(r)"
        case let .malformedTensor(p, t, r): "tensor '\(t)' in \(p) is malformed: \(r)"
        case let .unsupportedDType(p, t, d): "tensor '\(t)' in \(p) has unsupported dtype \(d) (supported: F32, F16, BF16, F64, I32, I64)"
        case let .missingTensor(t, s): "tensor '\(t)' is missing from \(s)"
        case let .shapeMismatch(t, e, f): "tensor '\(t)' has shape \(f), expected \(e)"
        case let .writeFailed(p, r): "cannot write \(p): \(r)"
        }
    }
}

/// One tensor's entry in a safetensors header.
public struct TensorInfo: Sendable, Equatable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    /// Byte range within the data section.
    public let begin: Int, end: Int
    public var elementCount: Int { shape.reduce(1, *) }
}

/// Bytes in memory owned by one object, freed with it (a downloaded safetensors file).
public final class ByteBlock: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let count: Int
    /// Takes ownership of `pointer` (from `UnsafeMutableRawPointer.allocate`).
    public init(adopting pointer: UnsafeMutableRawPointer, count: Int) { self.pointer = pointer; self.count = count }
    deinit { pointer.deallocate() }
}

/// A safetensors file: memory-mapped from disk, or held in memory (`ByteBlock`).
public final class SafetensorsFile {
    /// The file's path, or the name errors give a file held in memory.
    public let path: String
    public let tensors: [String: TensorInfo]
    public let metadata: [String: String]
    private let base: UnsafeRawPointer
    /// The mapping to undo (mapped files), or the bytes' owner (files in memory).
    private let mappedSize: Int?
    private let owner: ByteBlock?
    private let dataStart: Int

    /// Maps `path` and validates its header: sizes, dtypes, shapes and that every tensor's byte
    /// range lies inside the file and matches its shape.
    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw WeightsError.cannotOpen(path: path, reason: String(cString: strerror(errno))) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw WeightsError.cannotOpen(path: path, reason: "fstat failed") }
        let size = Int(st.st_size)
        // mmap refuses an empty file; `parse` checks every other size.
        guard size > 0 else { throw WeightsError.truncated(path: path, reason: "0 bytes, shorter than the 8-byte header length") }
        guard let m = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), m != MAP_FAILED else {
            throw WeightsError.cannotOpen(path: path, reason: "mmap failed: \(String(cString: strerror(errno)))")
        }
        var ok = false
        defer { if !ok { munmap(m, size) } }
        (tensors, metadata, dataStart) = try Self.parse(UnsafeRawPointer(m), size: size, path: path)
        base = UnsafeRawPointer(m)
        mappedSize = size
        owner = nil
        ok = true
    }

    /// The file held in `block`, validated as `init(path:)` validates a file; `name` stands for
    /// the path in errors.
    public init(block: ByteBlock, name: String) throws {
        path = name
        (tensors, metadata, dataStart) = try Self.parse(UnsafeRawPointer(block.pointer), size: block.count, path: name)
        base = UnsafeRawPointer(block.pointer)
        mappedSize = nil
        owner = block
    }

    deinit { if let mappedSize { munmap(UnsafeMutableRawPointer(mutating: base), mappedSize) } }

    /// The header of the `size`-byte file at `m`, checked.
    private static func parse(_ m: UnsafeRawPointer, size: Int, path: String) throws
        -> (tensors: [String: TensorInfo], metadata: [String: String], dataStart: Int) {
        guard size >= 8 else { throw WeightsError.truncated(path: path, reason: "\(size) bytes, shorter than the 8-byte header length") }
        let headerLength = Int(clamping: UInt64(littleEndian: m.loadUnaligned(as: UInt64.self)))
        guard headerLength <= size - 8 else {
            throw WeightsError.truncated(path: path, reason: "header claims \(headerLength) bytes, file has \(size - 8) after the length")
        }
        guard headerLength <= 100_000_000 else {
            throw WeightsError.malformedHeader(path: path, reason: "header length \(headerLength) exceeds 100 MB")
        }
        let headerData = Data(bytes: m + 8, count: headerLength)
        let parsed: Any
        do { parsed = try JSONSerialization.jsonObject(with: headerData) } catch {
            throw WeightsError.malformedHeader(path: path, reason: "not valid JSON")
        }
        guard let header = parsed as? [String: Any] else {
            throw WeightsError.malformedHeader(path: path, reason: "header is not a JSON object")
        }
        let dataSize = size - 8 - headerLength
        var tensors: [String: TensorInfo] = [:]
        var metadata: [String: String] = [:]
        for (name, value) in header {
            if name == "__metadata__" {
                if let meta = value as? [String: Any] {
                    for (k, v) in meta { if let s = v as? String { metadata[k] = s } }
                }
                continue
            }
            guard let entry = value as? [String: Any] else {
                throw WeightsError.malformedTensor(path: path, tensor: name, reason: "entry is not an object")
            }
            guard let dtypeName = entry["dtype"] as? String else {
                throw WeightsError.malformedTensor(path: path, tensor: name, reason: "no dtype")
            }
            guard let dtype = DType(rawValue: dtypeName) else {
                throw WeightsError.unsupportedDType(path: path, tensor: name, dtype: dtypeName)
            }
            guard let shapeAny = entry["shape"] as? [Any],
                  let shape = Self.integers(shapeAny), shape.allSatisfy({ $0 >= 0 }) else {
                throw WeightsError.malformedTensor(path: path, tensor: name, reason: "shape is not a list of non-negative integers")
            }
            guard let offsAny = entry["data_offsets"] as? [Any], let offs = Self.integers(offsAny),
                  offs.count == 2, offs[0] >= 0, offs[0] <= offs[1] else {
                throw WeightsError.malformedTensor(path: path, tensor: name, reason: "data_offsets is not [begin, end]")
            }
            var count = 1
            for d in shape {
                let (p, overflow) = count.multipliedReportingOverflow(by: d)
                guard !overflow, p < (1 << 40) else {
                    throw WeightsError.malformedTensor(path: path, tensor: name, reason: "shape \(shape) is too large")
                }
                count = p
            }
            guard offs[1] - offs[0] == count * dtype.byteSize else {
                throw WeightsError.malformedTensor(path: path, tensor: name,
                    reason: "byte range \(offs[1] - offs[0]) does not match shape \(shape) of \(dtypeName)")
            }
            guard offs[1] <= dataSize else {
                throw WeightsError.truncated(path: path, reason: "tensor '\(name)' ends at byte \(offs[1]) of a \(dataSize)-byte data section")
            }
            tensors[name] = TensorInfo(name: name, dtype: dtype, shape: shape, begin: offs[0], end: offs[1])
        }
        return (tensors, metadata, 8 + headerLength)
    }

    private static func integers(_ values: [Any]) -> [Int]? {
        var out: [Int] = []
        for v in values {
            guard let i = v as? Int else { return nil }
            out.append(i)
        }
        return out
    }

    /// Raw bytes of a tensor.
    public func rawPointer(_ info: TensorInfo) -> UnsafeRawPointer {
        base + dataStart + info.begin
    }

    /// Info of `name`, or an error naming it.
    public func info(_ name: String) throws -> TensorInfo {
        guard let info = tensors[name] else { throw WeightsError.missingTensor(tensor: name, searched: path) }
        return info
    }

    /// Converts tensor `name` to Float into `out`; its shape must equal `shape` when given.
    public func read(_ name: String, shape: [Int]? = nil, into out: UnsafeMutablePointer<Float>) throws {
        let info = try info(name)
        if let shape, shape != info.shape {
            throw WeightsError.shapeMismatch(tensor: name, expected: shape, found: info.shape)
        }
        convertToFloat(rawPointer(info), dtype: info.dtype, count: info.elementCount, into: out)
    }

    /// Tensor `name` as a Float array.
    public func floats(_ name: String) throws -> [Float] {
        let info = try info(name)
        return [Float](unsafeUninitializedCapacity: info.elementCount) { buf, n in
            convertToFloat(rawPointer(info), dtype: info.dtype, count: info.elementCount, into: buf.baseAddress!)
            n = info.elementCount
        }
    }

    /// Integer tensor `name` (I32 or I64) as Int array.
    public func integers(_ name: String) throws -> [Int] {
        let info = try info(name)
        let p = rawPointer(info)
        switch info.dtype {
        case .i32: return (0..<info.elementCount).map { Int(p.loadUnaligned(fromByteOffset: 4 * $0, as: Int32.self)) }
        case .i64: return (0..<info.elementCount).map { Int(p.loadUnaligned(fromByteOffset: 8 * $0, as: Int64.self)) }
        default: throw WeightsError.malformedTensor(path: path, tensor: name, reason: "expected an integer tensor, found \(info.dtype.rawValue)")
        }
    }
}

// MARK: - Writing

/// A tensor to write: name, shape, and Float data (converted to the file's dtype on write).
public struct TensorToWrite {
    public let name: String
    public let shape: [Int]
    public let data: UnsafeBufferPointer<Float>
    public init(name: String, shape: [Int], data: UnsafeBufferPointer<Float>) {
        self.name = name; self.shape = shape; self.data = data
    }
}

public enum SafetensorsWriter {
    /// Writes `tensors` as one safetensors file of `dtype` (F32 or BF16), with
    /// `{"format": "pt"}` metadata so transformers accepts it. Tensors are laid out in the
    /// order given; the header is padded to a multiple of 8 bytes.
    public static func write(_ tensors: [TensorToWrite], dtype: DType, to path: String,
                             metadata: [String: String] = [:]) throws {
        guard dtype == .f32 || dtype == .bf16 else {
            throw WeightsError.writeFailed(path: path, reason: "writing supports F32 and BF16, not \(dtype.rawValue)")
        }
        let headerBytes = try header(tensors.map { ($0.name, $0.shape, $0.data.count) }, dtype: dtype, metadata: metadata, path: path)
        guard let file = FileHandleWriter(path: path) else {
            throw WeightsError.writeFailed(path: path, reason: String(cString: strerror(errno)))
        }
        defer { file.close() }
        var len = UInt64(headerBytes.count).littleEndian
        try withUnsafeBytes(of: &len) { try file.write($0) }
        try headerBytes.withUnsafeBytes { try file.write($0) }
        let chunk = 1 << 20
        let staging = UnsafeMutableRawPointer.allocate(byteCount: chunk * dtype.byteSize, alignment: 16)
        defer { staging.deallocate() }
        for t in tensors {
            var i = 0
            while i < t.data.count {
                let n = min(chunk, t.data.count - i)
                if dtype == .f32 {
                    staging.copyMemory(from: t.data.baseAddress! + i, byteCount: n * 4)
                } else {
                    let out = staging.assumingMemoryBound(to: UInt16.self)
                    for k in 0..<n { out[k] = floatToBF16(t.data[i + k]).littleEndian }
                }
                try file.write(UnsafeRawBufferPointer(start: staging, count: n * dtype.byteSize))
                i += n
            }
        }
        try file.sync()
    }
}

extension SafetensorsWriter {
    /// The header of a file holding `tensors` (name, shape, value count) in the order given,
    /// padded with spaces to a multiple of 8 bytes.
    static func header(_ tensors: [(name: String, shape: [Int], count: Int)], dtype: DType, metadata: [String: String],
                       path: String) throws -> Data {
        var header: [String: Any] = [:]
        var meta = metadata
        if meta["format"] == nil { meta["format"] = "pt" }
        header["__metadata__"] = meta
        var offset = 0
        for t in tensors {
            let count = t.shape.reduce(1, *)
            guard count == t.count else {
                throw WeightsError.writeFailed(path: path, reason: "tensor '\(t.name)' has \(t.count) values for shape \(t.shape)")
            }
            let bytes = count * dtype.byteSize
            header[t.name] = ["dtype": dtype.rawValue, "shape": t.shape, "data_offsets": [offset, offset + bytes]] as [String: Any]
            offset += bytes
        }
        var headerBytes = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while headerBytes.count % 8 != 0 { headerBytes.append(0x20) }
        return headerBytes
    }
}

/// A whole safetensors file in memory, immutable once built: what `GET /v1/weights` serves.
/// Sendable by hand: the bytes are written in `init` and only read after.
public final class SafetensorsImage: @unchecked Sendable {
    /// One tensor: where its bytes lie in the image.
    public struct Entry: Sendable {
        public let name: String
        public let dtype: DType
        public let shape: [Int]
        /// Offset from the start of the image (header included) and length in bytes.
        public let offset: Int, length: Int
    }
    public let bytes: UnsafeMutableRawPointer
    public let count: Int
    public let entries: [Entry]

    /// Lays out `tensors` (name and shape) as one file of `dtype` (F32 or BF16); `fill(i, out)`
    /// writes tensor i's values as floats into `out` (scratch of its element count), which are
    /// then encoded in place.
    public init(tensors: [(name: String, shape: [Int])], dtype: DType, metadata: [String: String] = [:],
                fill: (Int, UnsafeMutablePointer<Float>) -> Void) throws {
        guard dtype == .f32 || dtype == .bf16 else {
            throw WeightsError.writeFailed(path: "<memory>", reason: "images hold F32 or BF16, not \(dtype.rawValue)")
        }
        let counts = tensors.map { $0.shape.reduce(1, *) }
        let header = try SafetensorsWriter.header(zip(tensors, counts).map { ($0.0.name, $0.0.shape, $0.1) }, dtype: dtype,
                                                  metadata: metadata, path: "<memory>")
        let dataStart = 8 + header.count
        let total = dataStart + counts.reduce(0, +) * dtype.byteSize
        let (bytes, capacity) = Self.take(max(total, 1))
        self.bytes = bytes
        self.capacity = capacity
        count = total
        bytes.storeBytes(of: UInt64(header.count).littleEndian, as: UInt64.self)
        header.withUnsafeBytes { (bytes + 8).copyMemory(from: $0.baseAddress!, byteCount: header.count) }
        var entries: [Entry] = []
        var offset = dataStart
        // F32 tensors are filled in place; BF16 ones through a float scratch.
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: dtype == .f32 ? 1 : max(1, counts.max() ?? 1))
        defer { scratch.deallocate() }
        for (i, t) in tensors.enumerated() {
            let n = counts[i], length = n * dtype.byteSize
            if dtype == .f32 {
                fill(i, (bytes + offset).bindMemory(to: Float.self, capacity: n))
            } else {
                fill(i, scratch)
                let out = (bytes + offset).assumingMemoryBound(to: UInt16.self)
                for k in 0..<n { out[k] = floatToBF16(scratch[k]).littleEndian }
            }
            entries.append(Entry(name: t.name, dtype: dtype, shape: t.shape, offset: offset, length: length))
            offset += length
        }
        self.entries = entries
    }

    private let capacity: Int

    deinit { Self.give(bytes, capacity) }

    // Buffers of images that are gone, kept for the next ones: on a VM whose memory the host
    // backs at first touch, a fresh 2 GB buffer costs seconds of page clearing (measured:
    // 9.7 s of 10 for the 0.5B shape's first publication), a reused one nothing.
    nonisolated(unsafe) private static var spare: [(UnsafeMutableRawPointer, Int)] = []
    private static let spareLock = NSLock()
    private static let spareKept = 2

    private static func take(_ bytes: Int) -> (UnsafeMutableRawPointer, Int) {
        spareLock.lock()
        // The smallest spare that fits without wasting more than half of it.
        let i = spare.indices.filter { spare[$0].1 >= bytes && spare[$0].1 <= 2 * bytes }.min { spare[$0].1 < spare[$1].1 }
        let got = i.map { spare.remove(at: $0) }
        spareLock.unlock()
        return got ?? (UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64), bytes)
    }

    private static func give(_ p: UnsafeMutableRawPointer, _ capacity: Int) {
        spareLock.lock()
        spare.append((p, capacity))
        spare.sort { $0.1 > $1.1 }
        let dropped = spare.count > spareKept ? Array(spare[spareKept...]) : []
        spare = Array(spare.prefix(spareKept))
        spareLock.unlock()
        for (q, _) in dropped { q.deallocate() }
    }
}

/// Minimal buffered-free POSIX file writer with error reporting and fsync.
final class FileHandleWriter {
    private let fd: Int32
    let path: String
    init?(path: String) {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        if fd < 0 { return nil }
    }
    func write(_ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw WeightsError.writeFailed(path: path, reason: String(cString: strerror(errno)))
            }
            done += n
        }
    }
    func sync() throws {
        if fsync(fd) != 0 { throw WeightsError.writeFailed(path: path, reason: "fsync: \(String(cString: strerror(errno)))") }
    }
    func close() { _ = Glibc.close(fd) }
}
