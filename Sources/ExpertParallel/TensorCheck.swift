/// Validation of tensor arguments: every error names the argument, the value and the bound.
package enum TensorCheck {
    package static func require(
        _ tensor: TensorRef?, _ name: String, dtypes: [DataType], shape: [Int],
        location: MemoryLocation = .host
    ) throws(EPError) {
        guard let tensor else {
            throw .invalidArgument(field: name, value: "nil", requirement: "is required by this layout and call")
        }
        guard dtypes.contains(tensor.dtype) else {
            throw .invalidArgument(
                field: "\(name).dtype", value: "\(tensor.dtype)",
                requirement: "must be \(dtypes.map(\.rawValue).joined(separator: " or "))")
        }
        guard tensor.shape == shape else {
            throw .invalidArgument(field: "\(name).shape", value: "\(tensor.shape)", requirement: "must be \(shape)")
        }
        try requireLaidOut(tensor, name, location: location)
    }

    /// `require` for the shape `[rows, columns]`, without building that array unless it fails.
    package static func require(
        _ tensor: TensorRef?, _ name: String, dtypes: [DataType], rows: Int, columns: Int,
        location: MemoryLocation = .host
    ) throws(EPError) {
        guard let tensor, dtypes.contains(tensor.dtype),
              tensor.shape.count == 2, tensor.shape[0] == rows, tensor.shape[1] == columns else {
            return try require(tensor, name, dtypes: dtypes, shape: [rows, columns], location: location)   // throws the named error
        }
        try requireLaidOut(tensor, name, location: location)
    }

    /// Contiguous, where the call runs, and an address wherever there are elements.
    private static func requireLaidOut(_ tensor: TensorRef, _ name: String, location: MemoryLocation) throws(EPError) {
        guard tensor.isContiguous else {
            throw .invalidArgument(
                field: "\(name).strides", value: "\(tensor.strides ?? [])", requirement: "must be contiguous (row-major)")
        }
        guard tensor.location == location else {
            throw .invalidArgument(field: "\(name).location", value: "\(tensor.location)", requirement: "must be \(location)")
        }
        guard tensor.address != nil || tensor.shape.contains(0) else {
            // (Counted with overflow: a shape the group expects may have more elements than Int holds.)
            let count = TensorRef.checkedProduct(tensor.shape).map { "\($0)" } ?? tensor.shape.map(String.init).joined(separator: " × ")
            throw .invalidArgument(field: "\(name).address", value: "nil", requirement: "must be non-nil for \(count) elements")
        }
    }
}
