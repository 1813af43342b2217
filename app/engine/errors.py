"""Errors a model step raises that the scheduler treats specially. Plain Python, no torch."""

from __future__ import annotations


class StepOutOfMemory(RuntimeError):
    """The accelerator ran out of memory in a step: the scheduler retries it once, split in two."""
