"""End to end in a real browser: headless Debian Chromium drives `streamlit run app.py`.

Runs a quantization, moves its bits slider with the keyboard, uploads a good image, a non-image and a file over the size limit;
opens a deep link as the first visit to a fresh server (a reloaded tab after a restart); screenshots go
to test-artifacts/ (git-ignored). Skipped, with the reason, only when chromium, its driver or
selenium are missing (CI installs them).
"""
from __future__ import annotations

import os

import pytest

from browser_e2e import (ROOT, browser_available, chromium, click_text, exceptions_on_page, open_page, page_text,
                         screenshot, screenshot_on_failure, settle, shows, streamlit_server, upload, wait_for)

pytestmark = pytest.mark.skipif(browser_available() is not None, reason=str(browser_available()))
ART = ROOT / "test-artifacts"


def _slider_thumb(driver, label: str):
    for box in driver.find_elements("css selector", "[data-testid='stSlider']"):
        if box.text.split("\n")[0].strip() == label:
            return box.find_element("css selector", "input[type='range']")
    return None


def _sidebar_labels(driver) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", "[data-testid='stSidebar'] [data-testid='stWidgetLabel']")]


def _nav_entries(driver) -> list[str]:
    return [e.text.split("\n")[-1] for e in driver.find_elements("css selector", "[data-testid='stSidebarNav'] a")]


def _full_app(driver, title: str) -> None:
    """app.py ran: its sidebar and wide layout, its navigation (no helper module), and the requested page."""
    def ready(d):
        return ("Dataset" in _sidebar_labels(d) and "Quantization" in _nav_entries(d)
                and title in [h.text for h in d.find_elements("css selector", "[data-testid='stMain'] h1")])
    wait_for(driver, ready, 30, f"app.py's sidebar (Dataset), navigation and the {title!r} page")
    nav = _nav_entries(driver)
    assert "Quantization" in nav and not {"shared", "technique", "app"} & {n.lower() for n in nav}, nav
    assert driver.find_element("css selector", "[data-testid='stAppViewContainer']").get_attribute("data-layout") == "wide"
    assert [h.text for h in driver.find_elements("css selector", "[data-testid='stMain'] h1")] == [title]
    assert not exceptions_on_page(driver)


def test_deep_link_as_first_visit_gets_the_full_app(tmp_path):
    """A fresh server whose first request is /quantization runs app.py (not pages/quantization.py alone, as Streamlit
    does for an app with a pages/ folder until st.navigation runs); a later session on / is the full app too."""
    log = ART / "browser-deep-link-streamlit.log"
    with streamlit_server(tmp_path / "cache", log) as url:     # an empty cache: nothing trains, nothing runs
        with chromium() as d, screenshot_on_failure(d, ART / "browser-deep-link-failure.png"):
            d.get(f"{url}/quantization")
            _full_app(d, "Quantization")
            assert d.current_url == f"{url}/quantization"
        with chromium() as d, screenshot_on_failure(d, ART / "browser-deep-link-failure-home.png"):
            d.get(url)
            _full_app(d, "Model Compression Lab")
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


def test_quantize_and_upload_in_a_real_browser(make_teacher, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    make_teacher("resnet34", epochs=1, subset=1500)
    good = tmp_path / "photo.png"
    Image.new("RGB", (120, 90), (200, 40, 40)).save(good)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG" + os.urandom(11 * 1024 * 1024))    # over server.maxUploadSize (10 MB)
    log = ART / "browser-streamlit.log"
    with streamlit_server(os.environ["COMPRESSION_LAB_CACHE"], log) as url, chromium() as d, \
            screenshot_on_failure(d, ART / "browser-failure.png"):
        open_page(d, url, "", "Ways to compress")
        assert "Generated data" in page_text(d)
        screenshot(d, ART / "browser-01-home.png")

        open_page(d, url, "quantization", "Before → after", timeout=300)   # auto-runs: no training
        assert "bits=8" in page_text(d)
        thumb = wait_for(d, lambda d: _slider_thumb(d, "bits"), 30, "the bits slider")
        d.execute_script("arguments[0].focus()", thumb)    # the range input is visually hidden
        ActionChains(d).send_keys(Keys.HOME).perform()      # one key, one rerun: bits=1 (binary weights)
        wait_for(d, shows("bits=1,"), 600, "the 1-bit result")
        settle(d, 300, "the 1-bit run")
        assert "smaller" in page_text(d)
        screenshot(d, ART / "browser-02-quantization.png")

        open_page(d, url, "try_image", "Try an image")
        click_text(d, "Upload")
        upload(d, good)
        wait_for(d, shows("photo.png: as the model sees it"), 120, "the uploaded image")
        settle(d, 120, "the predictions")
        assert "Teacher:" in page_text(d)
        screenshot(d, ART / "browser-03-upload.png")
        upload(d, bad)
        wait_for(d, shows("Cannot use notes.png"), 60, "the non-image message")
        screenshot(d, ART / "browser-04-bad-upload.png")
        upload(d, big)
        wait_for(d, shows("or smaller"), 60, "the upload size message")
        screenshot(d, ART / "browser-05-too-big.png")
        assert not exceptions_on_page(d)
    text = log.read_text()
    assert "Traceback" not in text and "WARNING" not in text.upper().replace("WARNINGS", ""), text[-2000:]
