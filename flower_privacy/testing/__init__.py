"""Test helpers for Flower apps and strategies: an in-process grid with fault injection."""

from flower_privacy.testing.grid import InProcessGrid, TranscriptEntry

__all__ = ["InProcessGrid", "TranscriptEntry"]
