"""A real uvicorn server on a free loopback port, in a thread, for the service tests (``vpr.steps.api.background``)."""

from vpr.steps.api.background import running

__all__ = ["running"]
