"""Test isolation: Prefect and DVC never phone home and never touch the user's state."""

import os
import tempfile

_prefect_home = tempfile.mkdtemp(prefix="vpr-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _prefect_home)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
