import CExpertParallel
import ExpertParallel

/// `epTensor_t` → `TensorRef`, with every field checked so that the library never reads a
/// shape it cannot multiply out or strides it does not support.
enum TensorDescriptor {
    /// Largest element count or byte count a tensor may have (far beyond any real buffer; keeps
    /// every size computation inside `Int`).
    static let maxBytes = 1 << 62

    /// The tensor `pointer` describes; `name` is the argument's name in error messages.
    static func tensor(_ pointer: UnsafePointer<epTensor_t>?, _ name: @autoclosure () -> String) throws(EPError) -> TensorRef {
        let t = try epTensor_t.read(pointer, name())
        let dtype = try ABIEnum.dataType(t.dtype, "\(name()).dtype")
        guard t.ndim >= 0, t.ndim <= EP_MAX_DIMS else {
            throw .invalidArgument(field: "\(name()).ndim", value: "\(t.ndim)", requirement: "must be in 0...\(EP_MAX_DIMS)")
        }
        let ndim = Int(t.ndim)
        let shape = int64Values(t.sizes, count: ndim)
        // Strides are read in place (only an error names them as an array): the data path
        // allocates one array per tensor, its shape.
        func strideAt(_ i: Int) -> Int {
            withUnsafeBytes(of: t.strides) { Int($0.loadUnaligned(fromByteOffset: i * 8, as: Int64.self)) }
        }
        // Every partial product of the sizes (either direction) stays below 2^62: the product of
        // the non-zero sizes does.
        var nonzeroProduct = 1
        for (i, size) in shape.enumerated() {
            guard size >= 0 else {
                throw .invalidArgument(field: "\(name()).sizes[\(i)]", value: "\(size)", requirement: "must be ≥ 0")
            }
            let (product, overflow) = nonzeroProduct.multipliedReportingOverflow(by: max(size, 1))
            guard !overflow, product <= maxBytes / dtype.byteSize else {
                throw .invalidArgument(field: "\(name()).sizes", value: "\(shape)", requirement: "must describe fewer than 2^62 bytes")
            }
            nonzeroProduct = product
        }
        let elements = shape.contains(0) ? 0 : nonzeroProduct
        var expected = 1
        for i in stride(from: ndim - 1, through: 0, by: -1) {
            guard shape[i] <= 1 || strideAt(i) == expected || elements == 0 else {
                let contiguous = contiguousStrides(shape)
                throw .invalidArgument(
                    field: "\(name()).strides", value: "\(int64Values(t.strides, count: ndim))",
                    requirement: "must be row-major contiguous for shape \(shape) (\(contiguous))")
            }
            expected *= shape[i]
        }
        let location = try MemoryLocation(device: t.device, "\(name()).device")
        guard t.data != nil || elements == 0 else {
            throw .invalidArgument(field: "\(name()).data", value: "NULL", requirement: "must not be NULL for \(elements) elements")
        }
        if let data = t.data, UInt(bitPattern: data) % UInt(dtype.byteSize) != 0 {
            throw .invalidArgument(field: "\(name()).data", value: "\(data)", requirement: "must be aligned to the element size (\(dtype.byteSize) bytes)")
        }
        return TensorRef(address: t.data, dtype: dtype, shape: shape, strides: nil, location: location)   // nil: row-major contiguous
    }

    /// The tensor `pointer` describes, or nil when the pointer is NULL (an optional tensor).
    static func optionalTensor(_ pointer: UnsafePointer<epTensor_t>?, _ name: @autoclosure () -> String) throws(EPError) -> TensorRef? {
        guard let pointer else { return nil }
        return try tensor(pointer, name())
    }

    /// The `epTensor_t` of a tensor the library owns (row-major contiguous), in `location`.
    static func describe(_ tensor: TensorRef, location: MemoryLocation) -> epTensor_t {
        var t = epTensor_t()
        t.structSize = epTensor_t.abiSize
        t.data = tensor.address
        t.dtype = ABIEnum.dataType(tensor.dtype)
        t.ndim = Int32(tensor.shape.count)
        setInt64Values(&t.sizes, tensor.shape)
        setInt64Values(&t.strides, contiguousStrides(tensor.shape))
        switch location {
        case .host: t.device = -1
        case .device(let ordinal): t.device = Int32(ordinal)
        }
        return t
    }

    static func contiguousStrides(_ shape: [Int]) -> [Int] {
        var strides = Array(repeating: 1, count: shape.count)
        for i in stride(from: shape.count - 2, through: 0, by: -1) { strides[i] = strides[i + 1] * shape[i + 1] }
        return strides
    }
}

extension MemoryLocation {
    /// The place an ABI struct's `device` field names: -1 the host, n ≥ 0 CUDA device n.
    init(device: Int32, _ name: @autoclosure () -> String) throws(EPError) {
        switch device {
        case -1: self = .host
        case 0...: self = .device(Int(device))
        default:
            throw .invalidArgument(field: name(), value: "\(device)", requirement: "must be -1 (host) or a CUDA device ordinal ≥ 0")
        }
    }
}
