"""Finds and loads libexpert_parallel.so."""

import ctypes
import os
import re
import threading
from pathlib import Path

from . import _abi
from .errors import LibraryNotFoundError, argument_names, call_names, from_status

LIBRARY_NAME = "libexpert_parallel.so"

_lock = threading.Lock()
_library = None
_path = None

#: Bumped by every call that masked a rank or met or saw a masked one (VirtualGroup.deactivate, an
#: epTimeout, an epInactiveRank: on the GPU, from the check() that reports it; active_ranks
#: finding a mask its group had not seen), in any group of this process: a mask known elsewhere
#: (the torch ops', for a GPU group) is read again once this has moved. (A GPU group's rank masked
#: by an epGroupDeactivateRank made through the raw C ABI is seen once active_ranks or a call
#: meets it; a CPU group's mask is read every call, which costs no synchronisation.)
mask_changes = 0


def candidates() -> "list[Path]":
    """Where the library is looked for, in order: $EP_LIBRARY (the file, or a folder holding it);
    next to this package; the repository's .build/release/ when the package runs from a source
    checkout; .build/release/ in the current directory and its parents."""
    found = []
    env = os.environ.get("EP_LIBRARY")
    if env:
        path = Path(env)
        found.append(path / LIBRARY_NAME if path.is_dir() else path)
        return found  # an explicit choice is never second-guessed
    here = Path(__file__).resolve().parent
    found.append(here / LIBRARY_NAME)
    found.append(here.parent.parent / ".build" / "release" / LIBRARY_NAME)
    cwd = Path.cwd().resolve()
    for folder in [cwd, *cwd.parents]:
        found.append(folder / ".build" / "release" / LIBRARY_NAME)
    unique = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def load() -> ctypes.CDLL:
    """The loaded library (loaded once per process)."""
    global _library, _path
    with _lock:
        if _library is not None:
            return _library
        tried = candidates()
        for path in tried:
            if path.is_file():
                try:
                    library = ctypes.CDLL(str(path))
                    _abi.declare(library)
                except (OSError, AttributeError) as error:   # not a shared library; one without the ABI's entry points
                    dependency = missing_dependency(error, path)
                    if dependency is not None:
                        raise LibraryNotFoundError(missing_dependency_message(path, dependency, error)) from error
                    raise LibraryNotFoundError(
                        f"{path} is not a loadable {LIBRARY_NAME} of ABI version {_abi.ABI_VERSION}: {error}; build it with "
                        "`scripts/build-library` (in the repository) and set EP_LIBRARY to the file") from None
                version = ctypes.c_int32(0)
                library.epGetAbiVersion(ctypes.byref(version))
                if version.value != _abi.ABI_VERSION:
                    raise LibraryNotFoundError(
                        f"{path} has ABI version {version.value}; this package needs {_abi.ABI_VERSION}")
                _library, _path = library, path
                return library
        listing = "\n  ".join(str(p) for p in tried)
        raise LibraryNotFoundError(
            f"{LIBRARY_NAME} not found; build it with `scripts/build-library` (in the "
            f"repository) and set EP_LIBRARY to the file if it is not in one of:\n  {listing}")


# The dynamic loader's error for a library it could not find: "libswiftCore.so: cannot open shared
# object file: No such file or directory" (the file named is the one not found).
_NOT_FOUND = re.compile(r"^(?P<name>[^:]+): cannot open shared object file")
# The Swift runtime's libraries: a library built by plain `swift build` loads them from the toolchain.
_SWIFT_RUNTIME = re.compile(r"^lib(swift\w*|Foundation\w*|dispatch|BlocksRuntime)\.so")


def missing_dependency(error: Exception, path: Path) -> "str | None":
    """The library that `path` needs and the dynamic loader did not find, as `error` (the
    OSError of loading `path`) names it; None for any other error (not a shared library, a
    missing symbol)."""
    if not isinstance(error, OSError):
        return None
    found = _NOT_FOUND.match(str(error))
    if found is None:
        return None
    name = found.group("name").strip()
    if name in (str(path), path.name) or Path(name) == path:   # (the file itself, unreadable)
        return None
    return name


def missing_dependency_message(path: Path, dependency: str, error: Exception) -> str:
    """The error of a `path` that needs `dependency`, which the dynamic loader did not find."""
    text = f"{path} needs {dependency}, which the dynamic loader did not find ({error})"
    if _SWIFT_RUNTIME.match(Path(dependency).name):
        return (f"{text}: a library built by plain `swift build` loads the Swift runtime from the toolchain; put the "
                "toolchain's usr/lib/swift/linux on LD_LIBRARY_PATH, or build the library with `scripts/build-library`, "
                "which links the runtime in")
    return f"{text}: install it, or put the folder holding it on LD_LIBRARY_PATH"


def library_path() -> Path:
    """The path of the loaded library (loading it first)."""
    load()
    assert _path is not None
    return _path


def addresses_entry(name):
    """Entry point `name` of the loaded library as a function of its arguments' addresses (ints,
    or None for NULL): each a machine word, no ctypes type checks per call. For the data path's
    calls, whose arguments the package made itself (a group handle, a call struct, a stream)."""
    function = load()[name]   # a function object of its own: the declared one keeps its types
    function.argtypes = [ctypes.c_void_p] * len(_abi.PROTOTYPES[name])
    function.restype = _abi.c_enum
    return function


def call(name, *arguments):
    """Calls entry point `name`; a failure raises the matching ExpertParallelError."""
    status = getattr(load(), name)(*arguments)
    if status != _abi.SUCCESS:
        _raise(status, lambda message: message)


def check_status(status, *fields, kind=None):
    """Raises the matching ExpertParallelError for a failed status of a group's data-path call
    (its message naming the caller's arguments by the group methods' keywords; `fields`: the
    call's errors.call_names tables, for its tensors besides the routing; `kind`: its arrays',
    "torch" or "numpy", as call_names takes it)."""
    if status != _abi.SUCCESS:
        if fields:
            table = {key: name for part in fields for key, name in part.items()}
            _raise(status, lambda message: argument_names(call_names(message, table, kind)))
        else:
            _raise(status, argument_names)


def _raise(status, naming):
    """Raises the error of failed `status`: the library's last message, `naming` applied."""
    global mask_changes
    if status in (_abi.TIMEOUT, _abi.INACTIVE_RANK):
        mask_changes += 1
    library = load()
    message = library.epGetLastErrorMessage().decode("utf-8", "replace")
    raise from_status(status, naming(message) or library.epGetErrorString(status).decode())
