import CExpertParallel
import ExpertParallel

/// The device fields of an `epBackendConfig_t` (`device`, `multiprocessors`), checked as
/// `epGroupCreate` checks them for each backend.
///
/// A virtual GPU group takes a device ordinal ≥ 0 and an SM count ≥ 0 (0: all); its device then
/// bounds the count. The host backend uses no device and runs no kernels, so neither field can
/// mean anything there: a value a GPU group refuses is refused in the GPU group's words (code
/// moved from the CPU to a GPU fails the same way), and any other value but 0 is refused as not
/// applying (an SM count the host took could still be past a GPU's SMs, which only a device can tell).
enum BackendChoice {
    /// The virtual GPU group's checks of `device` and `multiprocessors` (before any device is opened).
    static func gpuFields(device: Int32, multiprocessors: Int32) throws(EPError) {
        guard device >= 0 else {
            throw .invalidArgument(field: "backend.device", value: "\(device)", requirement: "must be a CUDA device ordinal ≥ 0")
        }
        guard multiprocessors >= 0 else {
            throw .invalidArgument(field: "backend.multiprocessors", value: "\(multiprocessors)", requirement: "must be ≥ 0 (0 = all)")
        }
    }

    /// The host backend's: the GPU group's checks, then 0 for each (what a zeroed struct holds).
    static func hostFields(device: Int32, multiprocessors: Int32) throws(EPError) {
        try gpuFields(device: device, multiprocessors: multiprocessors)
        guard device == 0 else {
            throw .invalidArgument(field: "backend.device", value: "\(device)",
                                   requirement: "must be 0 for epBackendHost (it uses no CUDA device; epBackendVirtualGPU takes one)")
        }
        guard multiprocessors == 0 else {
            throw .invalidArgument(field: "backend.multiprocessors", value: "\(multiprocessors)",
                                   requirement: "must be 0 for epBackendHost (it runs no kernels, so has no SMs to limit; "
                                       + "epBackendVirtualGPU takes a count)")
        }
    }
}
