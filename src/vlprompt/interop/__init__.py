"""Checkpoints of the research code, in and out: ``from_reference`` reads a checkpoint file as a released trainer
saved it and returns the vlprompt method with the same tensors; ``to_reference`` writes a method back in that
layout. One layout per repository trainer (``layouts.py``), registered by name in ``LAYOUTS``.

Every key of a checkpoint is accounted for in the returned :class:`ImportReport`: a tensor used (and where it went),
a buffer the released code recomputes from the class names (checked against this backbone where it can be), a
frozen CLIP weight (the backbone comes from ``--model``; only its shapes are checked), or trainer state (epoch,
optimiser). A key no layout knows is refused with the layout it looks like.
"""
from __future__ import annotations

from vlprompt.interop.base import (
    ImportReport,
    ReferenceError,
    ReferenceLayout,
    from_reference,
    read_checkpoint,
    save_reference,
    to_reference,
)
from vlprompt.interop.layouts import LAYOUTS

__all__ = ["LAYOUTS", "ImportReport", "ReferenceError", "ReferenceLayout", "from_reference", "read_checkpoint",
           "save_reference", "to_reference"]
