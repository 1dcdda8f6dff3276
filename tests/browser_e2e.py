"""Drive the real app in headless Debian Chromium (selenium + /usr/bin/chromedriver).

Used by tests/test_browser.py, and runnable to refresh the README screenshots:

    python tests/browser_e2e.py --cache /path/to/cache --out docs/screenshots

The cache must hold a trained teacher for the default dataset and model (`python -m core train`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser_available() -> str | None:
    """None when the browser test can run, else the reason it cannot."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return "Debian chromium/chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(cache: str | Path, log_path: Path, eval_size: int = 200):
    """`streamlit run app.py` on a free loopback port; yields the base URL; stops it afterwards."""
    port = free_port()
    env = dict(os.environ, COMPRESSION_LAB_CACHE=str(cache), COMPRESSION_LAB_OFFLINE="1",
               COMPRESSION_LAB_APP_EVAL=str(eval_size), PYTHONUNBUFFERED="1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        import urllib.request
        while True:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"streamlit did not start; log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lab-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, predicate, timeout: float = 120, what: str = "condition", poll: float = 0.5):
    deadline = time.time() + timeout
    last_exc = None
    while time.time() < deadline:
        try:
            value = predicate(driver)
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - elements come and go while Streamlit renders
            last_exc = exc
        time.sleep(poll)
    text = ""
    with contextlib.suppress(Exception):
        text = driver.find_element("css selector", "body").text[-1500:]
    raise TimeoutError(f"timed out waiting for {what} ({last_exc}); page text:\n{text}")


def page_text(driver) -> str:
    return driver.find_element("css selector", "[data-testid='stMain']").text


def idle(driver) -> bool:
    """Streamlit has finished the current run (no 'Running…' status widget)."""
    widgets = driver.find_elements("css selector", "[data-testid='stStatusWidget']")
    return not any("Running" in w.text or "Stop" in w.text for w in widgets)


def undrawn_charts(driver) -> list[str]:
    """The visible Altair charts that have not drawn their canvas or SVG yet, by position on the page
    (a chart in a closed expander may wait until it is opened)."""
    charts = driver.find_elements("css selector", "[data-testid='stVegaLiteChart']")
    return [f"chart {i + 1} of {len(charts)}" for i, c in enumerate(charts)
            if c.is_displayed() and not c.find_elements("css selector", "canvas, svg")]


def charts_drawn(driver) -> bool:
    """Every visible Altair chart on the page has drawn its canvas or SVG."""
    undrawn = undrawn_charts(driver)
    if undrawn:
        raise RuntimeError("not drawn: " + ", ".join(undrawn))   # wait_for reports the last one
    return True


def settle(driver, timeout: float = 120, what: str = "the page") -> None:
    wait_for(driver, idle, timeout, f"{what} to finish running")
    wait_for(driver, charts_drawn, 60, f"the charts of {what}")
    time.sleep(0.5)


class AppException(AssertionError):
    """The page shows a Streamlit exception box (an uncaught error in the app)."""


def shows(text: str):
    """Predicate for wait_for: `text` is on the page; fails at once if the app shows an exception."""
    def check(driver):
        errors = exceptions_on_page(driver)
        if errors:
            raise AppException(errors[0][:3000])
        return text in page_text(driver)
    return check


def open_page(driver, url: str, path: str, expect: str, timeout: float = 120) -> None:
    driver.get(f"{url}/{path}")
    wait_for(driver, shows(expect), timeout, f"{expect!r} on /{path}")
    settle(driver, timeout, f"/{path}")


def exceptions_on_page(driver) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", "[data-testid='stException']")]


def screenshot(driver, path: Path, max_width: int | None = None) -> Path:
    """Save a PNG; with max_width, shrink it and keep it under 300 KB (README images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    if max_width:
        from PIL import Image
        img = Image.open(path).convert("RGB")
        if img.width > max_width:
            img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
        img.save(path, optimize=True)
        if path.stat().st_size > 290_000:   # a 256-colour palette keeps chart colours and halves the size
            img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path


@contextlib.contextmanager
def screenshot_on_failure(driver, path: Path):
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            screenshot(driver, path)
        raise


def upload(driver, file_path: Path) -> None:
    inp = wait_for(driver, lambda d: d.find_element("css selector", "input[type='file']"), 30, "the file input")
    inp.send_keys(str(file_path))


def click_text(driver, text: str, css: str = "label, button, p") -> None:
    """Click the first visible element (radio label, button) whose text is `text`."""
    def find(d):
        for el in d.find_elements("css selector", css):
            if el.is_displayed() and el.text.strip() == text:
                return el
        return None
    wait_for(driver, find, 30, f"an element reading {text!r}").click()


def readme_screenshots(cache: Path, out: Path) -> list[Path]:
    """Home, a quantization result with its sweep, and the Compare charts, at README size."""
    shots = []
    with streamlit_server(cache, ROOT / "test-artifacts" / "readme-streamlit.log", eval_size=1000) as url, \
            chromium(1400, 1350) as d:
        open_page(d, url, "", "Ways to compress")
        shots.append(screenshot(d, out / "home.png", 1000))
        open_page(d, url, "quantization", "Before → after", timeout=900)
        click_text(d, "int8")                      # the real int8 model: smaller and faster
        wait_for(d, shows("mode=int8"), 900, "the int8 result")
        settle(d, 900, "the int8 result")
        shots.append(screenshot(d, out / "quantization.png", 1000))
        open_page(d, url, "compare", "Accuracy vs size")
        d.execute_script("document.querySelector('[data-testid=\"stMain\"]').scrollTo(0, 430)")
        time.sleep(1.5)
        shots.append(screenshot(d, out / "compare.png", 1000))
    return shots


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="COMPRESSION_LAB_CACHE with a trained teacher")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = ap.parse_args()
    why = browser_available()
    if why:
        sys.exit(why)
    for p in readme_screenshots(Path(args.cache), Path(args.out)):
        print(p, p.stat().st_size, "bytes")
