"""The error the DeepEP adapter raises for what it does not offer (yet)."""

from ...errors import InvalidUsageError


class NotSupportedError(InvalidUsageError, NotImplementedError):
    """A DeepEP argument or path the adapter does not support yet (internode, ...).
    The message names the argument, the value and what is supported. Also an
    :class:`expert_parallel.InvalidUsageError` and a :class:`NotImplementedError`."""


def not_supported(what: str, value: object, supported: str) -> NotSupportedError:
    """The error for ``what=value``: not supported yet; ``supported`` says what is."""
    return NotSupportedError(f"{what}={value!r}: not supported yet by expert_parallel.compat.deep_ep; {supported}")
