"""The HTTP localisation service (``vpr api``): FastAPI over the live release, hot-swapped."""

from vpr.api.app import create_app
from vpr.api.live import LiveRelease

__all__ = ["LiveRelease", "create_app"]
