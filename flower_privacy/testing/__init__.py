"""Test helpers for Flower apps and strategies: an in-process grid, log capture."""

from flower_privacy.testing.grid import InProcessGrid, TranscriptEntry
from flower_privacy.testing.logs import capture_log_lines

__all__ = ["InProcessGrid", "TranscriptEntry", "capture_log_lines"]
