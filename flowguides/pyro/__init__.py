"""The Pyro (torch) backend: flows, guides and fitting built from a `FlowSpec`."""

from __future__ import annotations

__all__: list[str] = []
