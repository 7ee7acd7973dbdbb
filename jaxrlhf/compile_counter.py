"""Counts XLA compilations, to assert that hot loops compile once and never again."""

from __future__ import annotations

import jax.monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """`with CompileCounter() as c: ...` then `c.count` is the number of XLA compilations inside."""

    def __init__(self):
        self.count = 0

    def _listen(self, event: str, duration: float, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)
