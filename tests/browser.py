"""Headless Chromium for tests: the system's ``/usr/bin/chromium`` driven by Playwright, no downloads.

``with chromium_page() as page:`` gives a Playwright ``Page`` in a fresh browser with its own temporary
profile, closed (and the profile deleted) afterwards. Set ``OMNIQ_TEST_CHROMIUM`` to use another binary;
``chromium_available()`` says whether one is there, for a skip condition. Nothing here needs pytest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def chromium_path() -> str | None:
    """The Chromium binary to use (``OMNIQ_TEST_CHROMIUM`` or /usr/bin/chromium), or None if there is none."""
    candidate = os.environ.get("OMNIQ_TEST_CHROMIUM", DEFAULT_CHROMIUM)
    path = Path(candidate) if os.sep in candidate else Path(shutil.which(candidate) or "")
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def chromium_available() -> bool:
    """Whether a Chromium binary and the playwright package are both installed."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return chromium_path() is not None


@contextmanager
def chromium_page(
    extra_args: Sequence[str] = (),
    viewport: tuple[int, int] = (1280, 900),
    timeout_ms: float = 15_000,
    **context_options: Any,
) -> Iterator[Any]:
    """A Playwright ``Page`` in a fresh headless Chromium with a temporary profile.

    ``extra_args`` are added to the standard flags (e.g. ``--allow-file-access-from-files``);
    ``context_options`` go to ``launch_persistent_context`` (e.g. ``http_credentials``).
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError(
            f"no Chromium at {os.environ.get('OMNIQ_TEST_CHROMIUM', DEFAULT_CHROMIUM)}: "
            "install it (apt-get install chromium) or set OMNIQ_TEST_CHROMIUM"
        )
    with tempfile.TemporaryDirectory(prefix="omniq-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=[*CHROMIUM_ARGS, *extra_args],
            viewport={"width": viewport[0], "height": viewport[1]},
            **context_options,
        )
        try:
            context.set_default_timeout(timeout_ms)
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()
