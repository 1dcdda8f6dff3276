"""End to end in a real browser: headless Debian Chromium drives `streamlit run app.py`.

Runs a quantization, moves its bits slider with the keyboard, uploads a good image, a non-image and a file over the size limit; screenshots go
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
        open_page(d, url, "", "Three ways to compress")
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
