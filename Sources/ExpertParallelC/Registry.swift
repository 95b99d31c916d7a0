import CExpertParallel
import ExpertParallel
import Foundation

/// The live objects behind the ABI's opaque pointers. An opaque pointer is only used after it
/// has been found here, so a NULL, stale or foreign pointer is an `epInvalidArgument` rather than
/// a crash; the registry's strong reference is the caller's.
///
/// The pointers are keys that no object of any kind gets twice in the process's life
/// (`OpaqueKeys`), never the objects' addresses: the allocator gives a freed object's address to
/// the next object of its size, which would make a destroyed group's pointer name the next group
/// made (another shape, another caller's routing) instead of being refused.
final class Registry<Object: AnyObject>: @unchecked Sendable {
    private let lock = NSLock()
    private var objects: [UnsafeMutableRawPointer: Object] = [:]
    private let kind: String

    init(kind: String) { self.kind = kind }

    func add(_ object: Object) -> OpaquePointer {
        let key = OpaqueKeys.next()
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

/// The opaque pointers' values, shared by every registry (so that one kind's pointer given as
/// another's is never found): 16-byte steps from a base that no allocation of this process
/// shares in practice, one per object made, none ever reused (2^40 of them before they wrap).
enum OpaqueKeys {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var count: UInt = 0   // under `lock`
    private static let base: UInt = 0x0E90_0000_0000_0000

    static func next() -> UnsafeMutableRawPointer {
        let n = lock.withLock { () -> UInt in
            count += 1
            return count
        }
        return UnsafeMutableRawPointer(bitPattern: base &+ (n & ((1 << 40) - 1)) &* 16)!
    }
}

let groupRegistry = Registry<GroupObject>(kind: "epGroup_t")
let handleRegistry = Registry<HandleObject>(kind: "epHandle_t")
