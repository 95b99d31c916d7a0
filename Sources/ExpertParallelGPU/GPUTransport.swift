/// How the kernels reach another rank's memory (ep_transport.cuh).
public enum GPUTransport: String, Sendable, Hashable, CaseIterable {
    /// Loads and stores through peer pointers: dispatch writes each row into its final slot on
    /// the destination, combine reads the expert outputs where they are. The fast path.
    case direct
    /// Put + signal, as NCCL's GPU-initiated networking does: dispatch puts rows into the
    /// destination's staging area, which the destination drains into its receive buffers;
    /// combine's expert side puts its rows back into their sources' staging areas. Virtual
    /// groups run it (one launch per phase) so the shape is tested on one GPU.
    case staged
}
