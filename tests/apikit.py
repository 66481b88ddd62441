"""A real uvicorn server on a free loopback port, in a thread, for the service tests (``vpr.api.background``)."""

from vpr.api.background import running

__all__ = ["running"]
