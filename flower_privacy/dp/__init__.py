"""Differential privacy: accounting (no Flower here)."""
