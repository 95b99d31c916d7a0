// expert_parallel._torch_fast: the common stacked dispatch and combine of a VirtualGroup with
// torch tensors, and the tensor reads of an NCCL rank's common calls (rank_inputs, address), read
// through torch's C++ tensor instead of its Python properties (each of which costs a torch call
// from Python: ~25 of them a dispatch). Built against the installed torch
// (python/setup.py, `pip install --no-build-isolation ./python`, or scripts/build-torch-fast); the
// package uses it when it imports and falls back to its Python path otherwise (EP_TORCH_FAST=0
// turns it off). Each function either takes the call whole, with exactly the checks of the
// package's in-line Python path (group.py: _common_inputs, _combine_common), writes the call's
// arguments into its epStackedDispatch_t / epStackedCombine_t and makes the C call, or, when
// anything is not that common call, returns None having written nothing: the Python path then
// takes the call and names what is wrong.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>

namespace {

using Entry = int (*)(void*, void*, void*);   // epGroupDispatchStacked / epGroupCombineStacked: (group, call, stream)

// What a group's calls compare with, made once per group (spec()).
struct Spec {
    PyTypeObject* tensor_type;   // torch.Tensor itself: subclasses take the Python path
    int64_t codes[7];            // epDataType_t of bf16, f16, f32, i32, i64, u8, e4m3 (from the package's _abi)
    int64_t ranks, hidden, max_tokens, top_k, element, device;   // the group's common dispatch (group._common)
    int64_t combine_element;     // the common combine's expert outputs (-1: never), recv shape below
    int64_t recv_shape[4];
    int recv_dims;
    uint64_t device_bits;        // an epStacked_t's second word: type | device << 32
    Entry dispatch, combine;
    void* group;
    // Byte offsets in the call structs (from the package's ctypes definitions).
    int64_t dispatch_inputs, dispatch_tokens, dispatch_direction, dispatch_launch, dispatch_phase, dispatch_step;
    int64_t combine_inputs, combine_direction, combine_launch, combine_phase, combine_step;
};

const char* const kSpec = "expert_parallel._torch_fast.Spec";

int64_t code_of(const Spec& spec, at::ScalarType type) {
    switch (type) {
        case at::kBFloat16: return spec.codes[0];
        case at::kHalf: return spec.codes[1];
        case at::kFloat: return spec.codes[2];
        case at::kInt: return spec.codes[3];
        case at::kLong: return spec.codes[4];
        case at::kByte: return spec.codes[5];
        case at::kFloat8_e4m3fn: return spec.codes[6];
        default: return -2;   // no group's type
    }
}

// The tensor behind `object` when it is a torch.Tensor (not a subclass) that the in-line path
// would read: strided, with storage, not nested. Null otherwise.
const at::Tensor* tensor_of(const Spec& spec, PyObject* object) {
    if (Py_TYPE(object) != spec.tensor_type) return nullptr;
    const at::Tensor& tensor = THPVariable_Unpack(object);
    if (!tensor.defined() || tensor.is_nested() || tensor.layout() != at::kStrided || !tensor.has_storage()) return nullptr;
    return &tensor;
}

// get_device() as the Python path reads it: -1 for the CPU, the ordinal for CUDA, -2 for any other
// device (a meta tensor's -1 there is caught by its address; here no group's device matches -2).
int64_t ordinal_of(const at::Tensor& tensor) {
    const c10::Device device = tensor.device();
    if (device.is_cpu()) return -1;
    if (device.is_cuda()) return device.index();
    return -2;
}

// _fast.sound and the address checks: a non-null address, no negative view, the storage holding
// the tensor's bytes from its address on. Returns the address, or 0 when any of that fails.
uintptr_t sound_address(const at::Tensor& tensor) {
    const auto address = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    if (address == 0 || tensor.is_neg()) return 0;
    const c10::Storage& storage = tensor.storage();
    const auto start = reinterpret_cast<uintptr_t>(storage.data());
    const auto bytes = static_cast<uintptr_t>(tensor.numel()) * tensor.element_size();
    if (address < start || address + bytes > start + storage.nbytes()) return 0;
    return address;
}

bool shape_is(const at::Tensor& tensor, c10::IntArrayRef shape) {
    return tensor.sizes().equals(shape);
}

void put_stacked(uint8_t* at, uint64_t address, uint64_t typed) {
    const uint64_t words[3] = {address, typed, 0};   // address; type | device << 32; rank stride (0: packed)
    std::memcpy(at, words, sizeof words);
}

template <typename T>
void put(uint8_t* base, int64_t offset, T value) {
    std::memcpy(base + offset, &value, sizeof value);
}

int call_entry(Entry entry, void* group, void* call, void* stream) {
    int status;
    Py_BEGIN_ALLOW_THREADS   // as ctypes' calls: other Python threads run while the library works
    status = entry(group, call, stream);
    Py_END_ALLOW_THREADS
    return status;
}

const Spec* spec_of(PyObject* capsule) {
    return static_cast<const Spec*>(PyCapsule_GetPointer(capsule, kSpec));
}

// The spec of a call `usage` of `count` arguments (args[0] the capsule), or null with a TypeError.
const Spec* spec_for(PyObject* const* args, Py_ssize_t count, Py_ssize_t expected, const char* usage) {
    if (count != expected) {
        PyErr_SetString(PyExc_TypeError, usage);
        return nullptr;
    }
    return spec_of(args[0]);
}

void* pointer_of(PyObject* value) {   // an int address or None
    return value == Py_None ? nullptr : PyLong_AsVoidPtr(value);
}

// dispatch(spec, xs, topk_idx, topk_weights, call, stream) -> (status, B, topk_idx's type,
// topk_weights' address) after the C call, or None when this is not the common call (nothing
// written). The common call: three stacked torch tensors [R, B, hidden] of the group's input type,
// [R, B, K] int32 or int64, [R, B, K] float32, on the group's device, contiguous, 0 < B ≤
// max_tokens, rows on an 8-byte boundary; forward, one launch, whole phase, the group's own step.
PyObject* dispatch(PyObject*, PyObject* const* args, Py_ssize_t count) {
    const Spec* spec = spec_for(args, count, 6, "dispatch(spec, xs, topk_idx, topk_weights, call, stream)");
    if (spec == nullptr) return nullptr;
    uintptr_t x = 0, idx = 0, weights = 0;
    int64_t b = 0, ic = 0;
    try {
        const at::Tensor* xs = tensor_of(*spec, args[1]);
        const at::Tensor* topk_idx = tensor_of(*spec, args[2]);
        const at::Tensor* topk_weights = tensor_of(*spec, args[3]);
        if (xs == nullptr || topk_idx == nullptr || topk_weights == nullptr || xs->dim() != 3) Py_RETURN_NONE;
        b = xs->size(1);
        ic = code_of(*spec, topk_idx->scalar_type());
        if (!(shape_is(*xs, {spec->ranks, b, spec->hidden}) && b > 0 && b <= spec->max_tokens
              && code_of(*spec, xs->scalar_type()) == spec->element && (ic == spec->codes[3] || ic == spec->codes[4])
              && code_of(*spec, topk_weights->scalar_type()) == spec->codes[2]
              && shape_is(*topk_idx, {spec->ranks, b, spec->top_k}) && shape_is(*topk_weights, {spec->ranks, b, spec->top_k})
              && ordinal_of(*xs) == spec->device && ordinal_of(*topk_idx) == spec->device && ordinal_of(*topk_weights) == spec->device
              && xs->is_contiguous() && topk_idx->is_contiguous() && topk_weights->is_contiguous())) {
            Py_RETURN_NONE;
        }
        x = sound_address(*xs);
        idx = sound_address(*topk_idx);
        weights = sound_address(*topk_weights);
        if (x == 0 || idx == 0 || weights == 0 || (x & 7) != 0) Py_RETURN_NONE;
    } catch (...) {   // a tensor torch cannot describe (no sizes or strides, no memory): the Python path names it
        Py_RETURN_NONE;
    }
    auto* call = static_cast<uint8_t*>(pointer_of(args[4]));
    void* stream = pointer_of(args[5]);
    if (PyErr_Occurred()) return nullptr;
    if (spec->dispatch == nullptr || call == nullptr) {
        PyErr_SetString(PyExc_ValueError, "dispatch: a spec without the C entry, or no call struct");
        return nullptr;
    }
    const uint64_t bits = spec->device_bits;
    uint8_t* inputs = call + spec->dispatch_inputs;   // topkIdx, inputTokens, topkWeights: adjacent epStacked_t
    put_stacked(inputs, idx, static_cast<uint64_t>(ic) | bits);
    put_stacked(inputs + 24, x, static_cast<uint64_t>(spec->element) | bits);
    put_stacked(inputs + 48, weights, static_cast<uint64_t>(spec->codes[2]) | bits);
    put<int64_t>(call, spec->dispatch_tokens, b);
    put<int32_t>(call, spec->dispatch_direction, 0);   // forward
    put<int32_t>(call, spec->dispatch_launch, 0);      // single
    put<int32_t>(call, spec->dispatch_phase, 0);       // whole
    put<void*>(call, spec->dispatch_step, nullptr);    // the group's own step
    const int status = call_entry(spec->dispatch, spec->group, call, stream);
    return Py_BuildValue("(iLLK)", status, static_cast<long long>(b), static_cast<long long>(ic),
                         static_cast<unsigned long long>(weights));
}

// combine(spec, expert_outputs, kept_weights, weights, tokens, call, stream, phase, step) -> status
// after the C call, or None when the expert outputs (or the dispatch's weights `kept_weights`, read
// again where they are now: LL expert-major; None otherwise) are not the common call's (nothing
// written). `weights`: the dispatch's weights' address as it took them (0: the call's kind set
// them); `tokens`: the dispatch's B, the weights' second size.
PyObject* combine(PyObject*, PyObject* const* args, Py_ssize_t count) {
    const Spec* spec = spec_for(args, count, 9, "combine(spec, expert_outputs, kept_weights, weights, tokens, call, stream, phase, step)");
    if (spec == nullptr) return nullptr;
    const auto weights = reinterpret_cast<uintptr_t>(pointer_of(args[3]));
    const long long tokens = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred()) return nullptr;
    uintptr_t address = 0;
    try {
        const at::Tensor* outputs = tensor_of(*spec, args[1]);
        if (outputs == nullptr || !shape_is(*outputs, c10::IntArrayRef(spec->recv_shape, spec->recv_dims))) Py_RETURN_NONE;
        if (code_of(*spec, outputs->scalar_type()) != spec->combine_element || ordinal_of(*outputs) != spec->device
            || !outputs->is_contiguous()) {
            Py_RETURN_NONE;
        }
        address = sound_address(*outputs);
        if (address == 0 || (address & 7) != 0) Py_RETURN_NONE;
        if (args[2] != Py_None) {   // the dispatch's weights: where the call took them, unchanged since
            const at::Tensor* kept = tensor_of(*spec, args[2]);
            if (kept == nullptr) Py_RETURN_NONE;
            if (!(shape_is(*kept, {spec->ranks, tokens, spec->top_k}) && code_of(*spec, kept->scalar_type()) == spec->codes[2]
                  && kept->is_contiguous() && sound_address(*kept) == weights)) {
                Py_RETURN_NONE;
            }
        }
    } catch (...) {
        Py_RETURN_NONE;
    }
    auto* call = static_cast<uint8_t*>(pointer_of(args[5]));
    void* stream = pointer_of(args[6]);
    const long phase = PyLong_AsLong(args[7]);
    void* step = pointer_of(args[8]);
    if (PyErr_Occurred()) return nullptr;
    if (spec->combine == nullptr || call == nullptr) {
        PyErr_SetString(PyExc_ValueError, "combine: a spec without the C entry, or no call struct");
        return nullptr;
    }
    const uint64_t bits = spec->device_bits;
    uint8_t* inputs = call + spec->combine_inputs;   // expertOutputs, then topkWeights
    put_stacked(inputs, address, static_cast<uint64_t>(spec->combine_element) | bits);
    if (weights != 0) put_stacked(inputs + 24, weights, static_cast<uint64_t>(spec->codes[2]) | bits);
    put<int32_t>(call, spec->combine_direction, 0);
    put<int32_t>(call, spec->combine_launch, 0);
    put<int32_t>(call, spec->combine_phase, static_cast<int32_t>(phase));
    put<void*>(call, spec->combine_step, step);
    return PyLong_FromLong(call_entry(spec->combine, spec->group, call, stream));
}

// rank_inputs(spec, x, topk_idx, topk_weights, needs_weights) -> (B, topk_idx's type, x's,
// topk_idx's and topk_weights' addresses (0: None)), or None: an NCCL rank's common dispatch
// (nccl_group.py, _dispatch_common): x [B, hidden] of the group's input type, topk_idx [B, K] int32
// or int64, topk_weights [B, K] float32 or (where the layout allows: not `needs_weights`) None, on
// the group's device, contiguous, sound, 0 < B ≤ max_tokens (an empty step takes the Python path).
PyObject* rank_inputs(PyObject*, PyObject* const* args, Py_ssize_t count) {
    const Spec* spec = spec_for(args, count, 5, "rank_inputs(spec, x, topk_idx, topk_weights, needs_weights)");
    if (spec == nullptr) return nullptr;
    const int needs_weights = PyObject_IsTrue(args[4]);
    if (needs_weights < 0) return nullptr;
    uintptr_t x = 0, idx = 0, weights = 0;
    int64_t b = 0, ic = 0;
    try {
        const at::Tensor* xs = tensor_of(*spec, args[1]);
        const at::Tensor* topk_idx = tensor_of(*spec, args[2]);
        const at::Tensor* topk_weights = args[3] == Py_None ? nullptr : tensor_of(*spec, args[3]);
        if (xs == nullptr || topk_idx == nullptr || (args[3] != Py_None && topk_weights == nullptr) || xs->dim() != 2) Py_RETURN_NONE;
        if (topk_weights == nullptr && needs_weights) Py_RETURN_NONE;
        b = xs->size(0);
        ic = code_of(*spec, topk_idx->scalar_type());
        if (!(shape_is(*xs, {b, spec->hidden}) && b > 0 && b <= spec->max_tokens && code_of(*spec, xs->scalar_type()) == spec->element
              && (ic == spec->codes[3] || ic == spec->codes[4]) && shape_is(*topk_idx, {b, spec->top_k})
              && ordinal_of(*xs) == spec->device && ordinal_of(*topk_idx) == spec->device && xs->is_contiguous() && topk_idx->is_contiguous())) {
            Py_RETURN_NONE;
        }
        if (topk_weights != nullptr) {
            if (!(shape_is(*topk_weights, {b, spec->top_k}) && code_of(*spec, topk_weights->scalar_type()) == spec->codes[2]
                  && ordinal_of(*topk_weights) == spec->device && topk_weights->is_contiguous())) {
                Py_RETURN_NONE;
            }
            weights = sound_address(*topk_weights);
            if (weights == 0) Py_RETURN_NONE;
        }
        x = sound_address(*xs);
        idx = sound_address(*topk_idx);
        if (x == 0 || idx == 0) Py_RETURN_NONE;
    } catch (...) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(LLKKK)", static_cast<long long>(b), static_cast<long long>(ic), static_cast<unsigned long long>(x),
                         static_cast<unsigned long long>(idx), static_cast<unsigned long long>(weights));
}

// address(spec, tensor, shape, code) -> the tensor's address, or None: a torch.Tensor (not a
// subclass) of exactly `shape` (a tuple of ints) and epDataType_t `code`, on the group's device,
// contiguous and sound (_fast.sound), at a non-null address. The NCCL rank's combine asks it of
// each tensor it takes.
PyObject* address(PyObject*, PyObject* const* args, Py_ssize_t count) {
    const Spec* spec = spec_for(args, count, 4, "address(spec, tensor, shape: tuple, code)");
    if (spec == nullptr) return nullptr;
    if (!PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "address: shape must be a tuple");
        return nullptr;
    }
    const Py_ssize_t dims = PyTuple_GET_SIZE(args[2]);
    const long long code = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return nullptr;
    uintptr_t found = 0;
    try {
        const at::Tensor* tensor = tensor_of(*spec, args[1]);
        if (tensor == nullptr || tensor->dim() != dims) Py_RETURN_NONE;
        for (Py_ssize_t i = 0; i < dims; ++i) {
            const long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(args[2], i));
            if (PyErr_Occurred()) return nullptr;
            if (tensor->size(i) != size) Py_RETURN_NONE;
        }
        if (code_of(*spec, tensor->scalar_type()) != code || ordinal_of(*tensor) != spec->device || !tensor->is_contiguous()) Py_RETURN_NONE;
        found = sound_address(*tensor);
        if (found == 0) Py_RETURN_NONE;
    } catch (...) {
        Py_RETURN_NONE;
    }
    return PyLong_FromUnsignedLongLong(found);
}

void free_spec(PyObject* capsule) {
    auto* spec = static_cast<Spec*>(PyCapsule_GetPointer(capsule, kSpec));
    if (spec == nullptr) return;
    Py_XDECREF(reinterpret_cast<PyObject*>(spec->tensor_type));
    delete spec;
}

bool read_ints(PyObject* tuple, int64_t* out, Py_ssize_t count, const char* name) {
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != count) {
        PyErr_Format(PyExc_TypeError, "spec: %s must be a tuple of %zd ints", name, count);
        return false;
    }
    for (Py_ssize_t i = 0; i < count; ++i) {
        out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, i));
        if (PyErr_Occurred()) return false;
    }
    return true;
}

// spec(tensor_type, codes, common, combine_element, recv_shape, entries, group, dispatch_offsets,
// combine_offsets) -> a capsule: codes (7 ints: bf16, f16, f32, i32, i64, u8, e4m3), common (6
// ints: ranks, hidden, max_tokens, top_k, element, device), recv_shape ([R, ...] of the combine's
// expert outputs), entries (the two C functions' addresses), dispatch_offsets (6: inputs, tokens,
// direction, launchMode, phase, step), combine_offsets (5: inputs, direction, launchMode, phase, step).
PyObject* spec(PyObject*, PyObject* const* args, Py_ssize_t count) {
    if (count != 9) {
        PyErr_SetString(PyExc_TypeError, "spec() takes 9 arguments");
        return nullptr;
    }
    auto* made = new Spec();
    int64_t common[6], entries[2], group = 0;
    bool fine = PyType_Check(args[0]) && read_ints(args[1], made->codes, 7, "codes") && read_ints(args[2], common, 6, "common");
    if (fine) {
        made->combine_element = PyLong_AsLongLong(args[3]);
        made->recv_dims = PyTuple_Check(args[4]) ? static_cast<int>(PyTuple_GET_SIZE(args[4])) : 0;
        fine = !PyErr_Occurred() && made->recv_dims >= 2 && made->recv_dims <= 4
               && read_ints(args[4], made->recv_shape, made->recv_dims, "recv_shape") && read_ints(args[5], entries, 2, "entries");
    }
    if (fine) {
        group = PyLong_AsLongLong(args[6]);
        int64_t d[6], c[5];
        fine = !PyErr_Occurred() && read_ints(args[7], d, 6, "dispatch_offsets") && read_ints(args[8], c, 5, "combine_offsets");
        if (fine) {
            made->dispatch_inputs = d[0], made->dispatch_tokens = d[1], made->dispatch_direction = d[2];
            made->dispatch_launch = d[3], made->dispatch_phase = d[4], made->dispatch_step = d[5];
            made->combine_inputs = c[0], made->combine_direction = c[1], made->combine_launch = c[2];
            made->combine_phase = c[3], made->combine_step = c[4];
        }
    }
    if (!fine) {
        delete made;
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "spec: tensor_type must be a type, recv_shape 2 to 4 ints");
        return nullptr;
    }
    Py_INCREF(args[0]);   // (the capsule's reference, released with it)
    made->tensor_type = reinterpret_cast<PyTypeObject*>(args[0]);
    made->ranks = common[0], made->hidden = common[1], made->max_tokens = common[2];
    made->top_k = common[3], made->element = common[4], made->device = common[5];
    made->device_bits = (static_cast<uint64_t>(made->device) & 0xFFFFFFFFull) << 32;
    made->dispatch = reinterpret_cast<Entry>(static_cast<uintptr_t>(entries[0]));
    made->combine = reinterpret_cast<Entry>(static_cast<uintptr_t>(entries[1]));
    made->group = reinterpret_cast<void*>(static_cast<uintptr_t>(group));
    PyObject* capsule = PyCapsule_New(made, kSpec, free_spec);
    if (capsule == nullptr) {
        Py_DECREF(args[0]);
        delete made;
    }
    return capsule;
}

int noop(void*, void*, void*) { return 0; }

// The address of a C entry that does nothing and succeeds: scripts/host-cost.py --stub times the
// package's own host work with it.
PyObject* noop_entry(PyObject*, PyObject*) {
    return PyLong_FromVoidPtr(reinterpret_cast<void*>(&noop));
}

PyMethodDef methods[] = {
    {"spec", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&spec)), METH_FASTCALL, "A group's spec (a capsule)."},
    {"dispatch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&dispatch)), METH_FASTCALL,
     "The common stacked dispatch: (status, B, routing type, weights address), or None."},
    {"combine", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&combine)), METH_FASTCALL,
     "The common stacked combine: status, or None."},
    {"rank_inputs", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rank_inputs)), METH_FASTCALL,
     "An NCCL rank's common dispatch inputs: (B, routing type, addresses), or None."},
    {"address", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&address)), METH_FASTCALL,
     "A tensor's address where it is of the shape, type and device asked, contiguous and sound; else None."},
    {"noop_entry", &noop_entry, METH_NOARGS, "The address of a C entry that does nothing."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_torch_fast", "The common calls' torch tensors read in C++.", -1, methods};

}  // namespace

#ifndef EP_TORCH_VERSION
#error "build with -DEP_TORCH_VERSION=\"<torch.__version__>\" (python/setup.py does)"
#endif

PyMODINIT_FUNC PyInit__torch_fast() {
    PyObject* made = PyModule_Create(&module);
    // The torch it was built against: the package uses the module only with that torch.
    if (made != nullptr && PyModule_AddStringConstant(made, "torch_version", EP_TORCH_VERSION) < 0) {
        Py_DECREF(made);
        return nullptr;
    }
    return made;
}
