@testable import ExpertParallelC
import CExpertParallel
import ExpertParallel
import ExpertParallelGPU
import Testing

/// The C layer's collective calls on a virtual GPU group (over the mock driver) keep the
/// descriptors they were given, converted; a descriptor changed in place is converted and
/// checked again, never served from what it was.
@Suite(.serialized)
struct DescriptorCacheTests {
    @Test func aDescriptorChangedInPlaceIsCheckedAgain() throws {
        try MockCUDA.run { _ in
            let device = try MockCUDA.device()
            let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 8, topK: 2, hidden: 128, elementType: .bf16, maxTokensPerRank: 4)
            let object = GroupObject(config: config, backend: try GPUBackend(VirtualGPUGroup(config, device: device)))
            let group = groupRegistry.add(object)
            defer { _ = cGroupDestroy(group) }
            var tensors: [DeviceTensor] = [], descriptors: [UnsafeMutablePointer<epTensor_t>] = []
            defer { for p in descriptors { p.deallocate() } }
            /// A device tensor (holding `host`'s bytes when given) and its descriptor, kept to the end.
            func described(_ dtype: DataType, _ shape: [Int], from host: HostTensor? = nil) throws -> UnsafeMutablePointer<epTensor_t> {
                let tensor = try DeviceTensor(dtype, shape, on: device)
                if let host { try tensor.upload(host) }
                tensors.append(tensor)
                let p = UnsafeMutablePointer<epTensor_t>.allocate(capacity: 1)
                p.initialize(to: TensorDescriptor.describe(tensor.ref, location: .device(0)))
                descriptors.append(p)
                return p
            }
            var update: [epUpdateInputs_t] = [], inputs: [epDispatchInputs_t] = [], outputs: [epDispatchOutputs_t] = []
            var tokens: [UnsafeMutablePointer<epTensor_t>] = []
            for _ in 0..<2 {
                let idx = try HostTensor(.i32, [4, 2])
                let ids = idx.storage.bindMemory(to: Int32.self, capacity: 8)
                for i in 0..<8 { ids[i] = Int32(i % 8) }
                var u = epUpdateInputs_t()
                u.structSize = epUpdateInputs_t.abiSize
                u.topkIdx = UnsafePointer(try described(.i32, [4, 2], from: idx))
                update.append(u)
                let x = try described(.bf16, [4, 128])
                tokens.append(x)
                var i = epDispatchInputs_t()
                i.structSize = epDispatchInputs_t.abiSize
                i.tokens = UnsafePointer(x)
                i.topkWeights = UnsafePointer(try described(.f32, [4, 2]))
                inputs.append(i)
                var o = epDispatchOutputs_t()
                o.structSize = epDispatchOutputs_t.abiSize
                o.tokens = UnsafePointer(try described(.bf16, config.receiveShape))
                outputs.append(o)
            }
            #expect(cGroupUpdateAll(group, update, nil, nil) == epSuccess)
            #expect(cGroupDispatchAll(group, inputs, outputs, nil, nil) == epSuccess)
            #expect(cGroupDispatchAll(group, inputs, outputs, nil, nil) == epSuccess)   // the same descriptors again
            // Rank 1's tokens, changed in place: a wrong type, then a wrong shape, then back.
            let good = tokens[1].pointee
            tokens[1].pointee.dtype = epFloat32
            #expect(cGroupDispatchAll(group, inputs, outputs, nil, nil) == epInvalidArgument)
            #expect(String(cString: cGetLastErrorMessage()).contains("tokens.dtype = epFloat32"))
            tokens[1].pointee = good
            tokens[1].pointee.sizes.1 = 64
            tokens[1].pointee.strides.0 = 64
            #expect(cGroupDispatchAll(group, inputs, outputs, nil, nil) == epInvalidArgument)
            #expect(String(cString: cGetLastErrorMessage()).contains("epGroupDispatchAll: invalid argument: inputs[1].tokens.sizes = [4, 64]"))
            tokens[1].pointee = good
            #expect(cGroupDispatchAll(group, inputs, outputs, nil, nil) == epSuccess)
        }
    }
}
