"""What every group object shares: its lifetime (close, ``with``, garbage collection), the
device status check, the active-rank mask and output descriptors."""

import ctypes

from . import _arrays
from ._library import call
from .errors import InvalidUsageError


class GroupBase:
    """A group object holding an epGroup_t in ``_group`` (None once closed) on device ``_device``."""

    _group = None

    def close(self):
        """Releases the group (also done when it is garbage-collected)."""
        group, self._group = getattr(self, "_group", None), None
        if group:
            call("epGroupDestroy", group)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check(self):
        """Waits for the group's GPU work and raises the first error recorded on the device
        (invalid routing, an overflow with overflow="fail", a timeout). The CPU backend reports
        errors from the calls themselves."""
        self._check_open()
        call("epGroupCheckStatus", self._group)

    def synchronize(self):
        """The same as :meth:`check`."""
        self.check()

    @property
    def active_ranks(self):
        """The ranks that take part in calls (a rank that timed out is masked); on the GPU this
        waits for the device."""
        self._check_open()
        mask = ctypes.c_uint64()
        call("epGroupGetActiveRanks", self._group, ctypes.byref(mask))
        return [r for r in range(self.ranks) if mask.value >> r & 1]

    def _check_open(self):
        if not self._group:
            raise InvalidUsageError("the group is closed")

    def _describe_output(self, value, ep_type, name):
        shape = tuple(int(s) for s in value.shape)
        return _arrays.tensor(value, name, dtypes={ep_type}, device=self._device, shape=shape)
