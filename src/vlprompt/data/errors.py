"""The single error type raised for bad dataset input."""

from __future__ import annotations


class DatasetError(ValueError):
    """Raised for every problem with dataset files, layouts or arguments.

    Messages always name the offending file/folder *and* say how to fix it, because the usual cause is a
    data root that does not match the expected CoOp layout and the user must act on the message alone.
    Subclassing ValueError lets generic callers (CLI argument handling) treat it as bad input.
    """
