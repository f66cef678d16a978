"""Check the built documentation site as a reader's browser sees it.

    python docs/check_site.py [SITE_DIR]      # default: build into a temporary directory

Fails (exit 1, naming the page) on

* a broken link: a relative ``href``/``src`` whose target file is not in the site;
* an empty API page: ``api/index.html`` with no rendered object (mkdocstrings output);
* a console error: every page is loaded in headless Chromium (served from 127.0.0.1) and any
  uncaught error, failed resource load or ``console.error`` fails the check.

Needs ``mkdocs`` (the ``docs`` extra) and a ``chromium`` (or ``chromium-browser``,
``google-chrome``) executable on PATH; ``nox -s site`` runs it.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: what Chromium's console log says when a page has an error
CONSOLE_ERRORS = re.compile(r"Uncaught|Failed to load resource|console\.error|ERROR:CONSOLE")


class _Links(HTMLParser):
    """The ``href`` and ``src`` attributes of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.api_objects = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)
            if name == "class" and value and "doc-object" in value.split():
                self.api_objects += 1


def broken_links(site: Path) -> list[str]:
    """``page: link`` for every relative link whose target is not in the site."""
    bad = []
    for page in sorted(site.rglob("*.html")):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        for link in parser.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or not parts.path or link.startswith("#"):
                continue  # external, or an anchor on this page
            path = unquote(parts.path)
            base = site if path.startswith("/") else page.parent  # (root-relative links)
            target = (base / path.lstrip("/")).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                bad.append(f"{page.relative_to(site)}: {link}")
    return bad


def api_objects(site: Path) -> int:
    """How many documented objects the API page renders."""
    page = site / "api" / "index.html"
    if not page.exists():
        return 0
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.api_objects


def browser() -> str | None:
    """A headless-capable Chromium on PATH, or None."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def console_errors(site: Path, exe: str) -> list[str]:
    """``page: message`` for every console error headless Chromium reports on a page of
    the site, served from a local HTTP server on 127.0.0.1 (an ephemeral port)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a, **k: None  # type: ignore
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    errors = []
    try:
        with tempfile.TemporaryDirectory() as profile:
            for page in sorted(site.rglob("*.html")):
                rel = page.relative_to(site).as_posix()
                url = f"http://127.0.0.1:{port}/{rel}"
                proc = subprocess.run(
                    [exe, "--headless=new", "--no-sandbox", "--disable-gpu",
                     "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr",
                     "--v=0", "--virtual-time-budget=3000", "--dump-dom", url],
                    capture_output=True, text=True, timeout=60)
                for line in proc.stderr.splitlines():
                    if "CONSOLE" in line and CONSOLE_ERRORS.search(line):
                        errors.append(f"{rel}: {line.strip()}")
                if proc.returncode != 0 or "<html" not in proc.stdout.lower():
                    errors.append(f"{rel}: the browser did not render it (exit "
                                  f"{proc.returncode})")
    finally:
        server.shutdown()
    return errors


def main() -> int:
    if len(sys.argv) > 1:
        site = Path(sys.argv[1])
    else:
        site = Path(tempfile.mkdtemp(prefix="gfcomb-site-"))
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                        str(site)], cwd=ROOT, check=True)
    problems = [f"broken link: {b}" for b in broken_links(site)]
    n_api = api_objects(site)
    if n_api < 10:
        problems.append(f"empty API page: api/index.html renders {n_api} objects")
    exe = browser()
    if exe is None:
        problems.append("no Chromium on PATH (apt-get install chromium) to render the pages")
    else:
        problems += [f"console error: {e}" for e in console_errors(site, exe)]
    pages = len(list(site.rglob("*.html")))
    for p in problems:
        print(p)
    print(f"{pages} pages, {n_api} API objects: "
          + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
