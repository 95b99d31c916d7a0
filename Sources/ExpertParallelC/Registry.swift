import CExpertParallel
import ExpertParallel
import Foundation

/// The live objects behind the ABI's opaque pointers. An opaque pointer is only used after it
/// has been found here, so a NULL, stale or foreign pointer is an `epInvalidArgument` rather than
/// a crash; the registry's strong reference is the caller's.
final class Registry<Object: AnyObject>: @unchecked Sendable {
    private let lock = NSLock()
    private var objects: [UnsafeMutableRawPointer: Object] = [:]
    private let kind: String

    init(kind: String) { self.kind = kind }

    func add(_ object: Object) -> OpaquePointer {
        let key = Unmanaged.passUnretained(object).toOpaque()
        lock.withLock { objects[key] = object }
        return OpaquePointer(key)
    }

    func object(_ pointer: OpaquePointer?, _ name: String) throws(EPError) -> Object {
        guard let pointer else {
            throw .invalidArgument(field: name, value: "NULL", requirement: "must be an \(kind) made by the library")
        }
        guard let object = lock.withLock({ objects[UnsafeMutableRawPointer(pointer)] }) else {
            throw .invalidArgument(field: name, value: "\(pointer)", requirement: "must be a live \(kind) (not destroyed, not another kind of object)")
        }
        return object
    }

    /// Drops the caller's reference (NULL: nothing to do).
    func remove(_ pointer: OpaquePointer?, _ name: String) throws(EPError) {
        guard let pointer else { return }
        guard lock.withLock({ objects.removeValue(forKey: UnsafeMutableRawPointer(pointer)) }) != nil else {
            throw .invalidArgument(field: name, value: "\(pointer)", requirement: "must be a live \(kind) (not destroyed before)")
        }
    }
}

let groupRegistry = Registry<GroupObject>(kind: "epGroup_t")
let handleRegistry = Registry<HandleObject>(kind: "epHandle_t")
