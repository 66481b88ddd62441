"""Wait until a Prefect API answers its health check (``make up`` starts ``serve`` only then).

    python -m flows.wait_for_api http://127.0.0.1:4200/api [--timeout 120]

Exits 0 once ``GET <api>/health`` returns 200, 1 after the timeout; each probe is bounded (2 s).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


def wait_for_api(api_url: str, timeout: float) -> bool:
    """Whether the API answered within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.wait_for_api", description=__doc__.split("\n")[0])
    parser.add_argument("api_url")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if wait_for_api(args.api_url, args.timeout):
        return 0
    print(f"no Prefect API at {args.api_url} after {args.timeout:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
