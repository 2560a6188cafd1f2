#!/usr/bin/env python3
"""Container health check: GET a URL of this container and exit 0 on a 2xx answer, 1 otherwise.

Installed in the omniq images as ``omniq-healthcheck`` (docker-compose.yml uses it for the webhook, Flower
and the workers' metrics endpoint), so the images need neither curl nor wget. Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import urllib.error
import urllib.request


def check(url: str, basic_auth: str | None, timeout: float) -> str | None:
    """None when ``url`` answers 2xx, else what went wrong (never the credentials)."""
    request = urllib.request.Request(url, method="GET")  # noqa: S310 - the URL comes from the compose file
    if basic_auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(basic_auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return None if 200 <= response.status < 300 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return f"{url}: HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return f"{url}: {getattr(error, 'reason', error)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omniq-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="e.g. http://127.0.0.1:8080/healthz")
    parser.add_argument(
        "--basic-auth-env", metavar="NAME", help="send basic auth taken from this variable (user:password)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    basic_auth = None
    if args.basic_auth_env:
        basic_auth = os.environ.get(args.basic_auth_env)
        if not basic_auth:
            print(f"omniq-healthcheck: {args.basic_auth_env} is not set", file=sys.stderr)
            return 1
    problem = check(args.url, basic_auth, args.timeout)
    if problem:
        print(f"omniq-healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
