"""The draw-a-digit page of ``mnist-jax serve`` in a real browser.

Headless Chromium (Debian's ``chromium`` and ``chromium-driver`` packages, driven by
selenium through ``/usr/bin/chromedriver``) loads the page from a server on 127.0.0.1,
draws a "1" (one vertical stroke, with a mouse) and a "7" (a bar and a diagonal, with a
pen, and by touch in a phone-sized window) through WebDriver pointer actions, and reads the
predicted digit from the page. The model is an MLP trained for one epoch on real MNIST.
The browser's console must stay free of errors, and the page's Content-Security-Policy
forbids anything from elsewhere, so an external asset would show up there too.

``MNIST_JAX_SERVE_SCREENSHOT=docs/images/serve.png`` keeps a screenshot of the page after
the "7" (how the README's picture is made).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn): "
                    "pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn): "
                    "pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="selenium drives the browser: pip install selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from mnist_jax import cli, serve  # noqa: E402
from mnist_jax.atomic import write_atomic  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT_ENV = "MNIST_JAX_SERVE_SCREENSHOT"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (shutil.which("chromium") and Path(CHROMEDRIVER).is_file()),
                       reason="needs Debian's chromium and chromium-driver packages "
                              "(apt-get install chromium chromium-driver; .ci/run does)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, mnist_dir):
    run = tmp_path_factory.mktemp("browser_run") / "mlp-mnist"
    assert cli.main(["train", "--data-dir", str(mnist_dir), "--out", str(run), "--epochs", "1",
                     "--quiet"]) == 0
    with serve.start_server(run) as handle:
        yield handle


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=960,800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _stroke(driver, canvas, points, kind: str = interaction.POINTER_MOUSE) -> None:
    """One stroke through ``points`` (offsets from the canvas' centre, as fractions of its
    half-width), with a pointer of ``kind``: down at the first, moves, up at the last."""
    half = canvas.rect["width"] / 2
    pointer = PointerInput(kind, kind)
    chain = ActionChains(driver, devices=[pointer])
    x, y = points[0]
    chain.move_to_element_with_offset(canvas, round(x * half), round(y * half)).click_and_hold()
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        for t in (0.25, 0.5, 0.75, 1.0):  # intermediate moves, as a hand makes them
            px, py = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            chain.move_to_element_with_offset(canvas, round(px * half), round(py * half))
    chain.release().perform()


def _prediction_after(driver, count: int) -> int:
    WebDriverWait(driver, 20).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-predictions")
        == str(count))
    return int(driver.find_element(By.ID, "digit").text)


def _errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_drawn_one_and_seven_are_recognised_without_console_errors(server, browser, tmp_path):
    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(
        lambda d: "test accuracy" in d.find_element(By.ID, "model").text)
    corner = browser.find_element(By.ID, "model").text
    assert corner.startswith("mlp-mnist · mlp") and "%" in corner
    canvas = browser.find_element(By.ID, "canvas")

    _stroke(browser, canvas, [(0.0, -0.6), (0.0, 0.6)])  # a "1": one vertical stroke
    assert _prediction_after(browser, 1) == 1
    seen = browser.find_element(By.ID, "seen").get_attribute("src")
    assert seen.startswith("data:image/png;base64,")
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .pct")
    assert len(bars) == 10 and all(b.text.endswith("%") for b in bars)

    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "digit").text == "?"
    # a "7": the bar, then the diagonal down to the left, in one stroke of a pen
    _stroke(browser, canvas, [(-0.45, -0.55), (0.45, -0.55), (-0.1, 0.6)],
            kind=interaction.POINTER_PEN)
    assert _prediction_after(browser, 2) == 7

    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get(SCREENSHOT_ENV):
        write_atomic(os.environ[SCREENSHOT_ENV], shot.read_bytes())
    assert _errors(browser) == []


def test_upload_button_predicts_a_file_on_a_phone_sized_window(server, browser, tmp_path):
    import numpy as np
    from PIL import Image
    browser.set_window_size(412, 915)
    browser.get(server.url + "/")
    canvas = browser.find_element(By.ID, "canvas")
    width = browser.execute_script("return document.documentElement.clientWidth")
    assert width <= 420
    # nothing sticks out sideways: no horizontal scrolling on a phone
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    assert canvas.is_displayed() and canvas.rect["width"] <= width
    # a dark "1" on light paper, as a photo would be
    paper = np.full((120, 90), 235, np.uint8)
    paper[15:105, 40:52] = 30
    path = tmp_path / "one.png"
    Image.fromarray(paper).save(path)
    browser.find_element(By.ID, "file").send_keys(str(path))
    assert _prediction_after(browser, 1) == 1
    # a finger on the phone: a "7" drawn by touch
    browser.find_element(By.ID, "clear").click()
    _stroke(browser, canvas, [(-0.45, -0.55), (0.45, -0.55), (-0.1, 0.6)],
            kind=interaction.POINTER_TOUCH)
    assert _prediction_after(browser, 2) == 7
    assert browser.execute_script("return window.scrollY") == 0  # the stroke did not scroll
    assert _errors(browser) == []
