"""The ``vpr`` command line (``vpr --help``): the app of ``vpr.cli.base`` with the commands of
``vpr.cli.steps`` (made from the step table), ``vpr.cli.commands`` and ``vpr.cli.ablation``."""

from vpr.cli import ablation, commands, steps  # noqa: F401  (each registers its commands on the app)
from vpr.cli.base import app

__all__ = ["app"]
