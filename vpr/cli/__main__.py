"""``python -m vpr.cli`` (what torchrun ranks and the tests start)."""

from vpr.cli import app

app(prog_name="vpr")
