"""Test helpers: the tiny offline model zoo (``tiny_path``, ``load_tiny_pipeline``, ``FAMILIES``)."""

from fewstep.testing.zoo import (
    FAMILIES,
    apply_resolution_marker,
    build_tiny_pipeline,
    cache_root,
    load_tiny_pipeline,
    tiny_path,
)

__all__ = [
    "FAMILIES",
    "apply_resolution_marker",
    "build_tiny_pipeline",
    "cache_root",
    "load_tiny_pipeline",
    "tiny_path",
]
