"""The SSE codec now lives in :mod:`medmvl_core.client.protocol`; re-exported for old imports."""

from medmvl_core.client.protocol import SSEEvent, format_sse, iter_sse

__all__ = ["SSEEvent", "format_sse", "iter_sse"]
