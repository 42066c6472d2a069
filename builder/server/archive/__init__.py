"""The streaming build context pipeline: decompress, parse every tar header, check, re-emit a canonical tar."""

from __future__ import annotations

from builder.server.archive.rewrite import ContextRewriter

__all__ = ["ContextRewriter"]
