import ExpertParallel
import Testing

/// A view keeps the buffer it views alive: an optimised build frees an object right after its
/// last use, which in `group.dispatch(..., x.ref)` comes before the call reads `x` (seen: a
/// heap-use-after-free under AddressSanitizer in a release build, heap corruption on a 16-core host).
@Suite("Tensor views own their buffers")
struct TensorRefOwnershipTests {
    @Test func aHostTensorLivesAsLongAsItsView() throws {
        var tensor: HostTensor? = try HostTensor(.f32, [4, 8])
        weak let watched = tensor
        let view = tensor!.ref
        tensor = nil
        #expect(watched != nil, "the view's buffer was freed while the view lives")
        #expect(view.address == watched.map { $0.storage })
        withExtendedLifetime(view) {}
    }

    @Test func aViewWithoutAnOwnerOwnsNothing() throws {
        var tensor: HostTensor? = try HostTensor(.f32, [2])
        weak let watched = tensor
        let borrowed = TensorRef(address: tensor!.storage, dtype: .f32, shape: [2])
        tensor = nil
        #expect(watched == nil, "a view made from an address alone must not keep anything alive")
        withExtendedLifetime(borrowed) {}
    }
}
