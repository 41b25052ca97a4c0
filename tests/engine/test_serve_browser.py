"""``ore serve``'s page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven through Selenium) loads the page from a live uvicorn server,
uploads a toy image through the file picker, and sees boxes drawn on the canvas and one
table row per box; the score slider hides rows and the EBUI switch asks again without
energies."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from ore.cli import parse_args
from ore.cli.detect import model_source
from ore.engine.inference import Predictor
from ore.engine.serve import build_app
from tests.cli.test_detect_run import write_stage

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_BROWSER = Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()

pytestmark = pytest.mark.skipif(
    not HAVE_BROWSER and not os.environ.get("CI"),
    reason="Debian packages chromium and chromium-driver are not installed (.ci/run installs "
           "them; under CI=true this test runs and fails)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    stage = write_stage(tmp_path_factory.mktemp("run") / "t1_ft", fit=True)
    args = parse_args(["serve", "--run", str(stage)])
    cfg, weights = model_source(args, args.overrides)
    app = build_app(Predictor(cfg, weights, score_thresh=0.0))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


# Pixels of the visible canvas that differ from the picture itself, and whether each lies on
# a drawn box's outline or label (the boxes of the table's rows, widened by the line width
# and the label's height above).
_DIFF = """
const cv = document.getElementById('canvas'), w = cv.width, h = cv.height;
const ref = document.createElement('canvas'); ref.width = w; ref.height = h;
ref.getContext('2d').drawImage(picture, 0, 0);
const a = cv.getContext('2d').getImageData(0, 0, w, h).data;
const b = ref.getContext('2d').getImageData(0, 0, w, h).data;
const boxes = record.boxes.filter((_, i) => record.scores[i] >= parseFloat(
  document.getElementById('score').value));
let changed = 0, outside = 0;
for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
  const k = 4 * (y * w + x);
  if (a[k] === b[k] && a[k + 1] === b[k + 1] && a[k + 2] === b[k + 2]) continue;
  changed++;
  const near = boxes.some(q => x >= q[0] - 3 && x <= Math.max(q[2] + 3, q[0] + 200)
                              && y >= q[1] - 17 && y <= q[3] + 3);
  if (!near) outside++;
}
// Each tall enough box's left and right sides: sampled points below its label where a
// pixel within one of the side's x changed.
let sides = 0, traced = 0;
const diff = (x, y) => { const k = 4 * (y * w + x);
  return a[k] !== b[k] || a[k + 1] !== b[k + 1] || a[k + 2] !== b[k + 2]; };
for (const q of boxes) {
  if (q[3] - q[1] < 24) continue;
  for (const x0 of [q[0], q[2]]) for (let t = 0; t < 10; t++) {
    const y = Math.round(q[1] + 16 + (q[3] - q[1] - 18) * t / 10);
    const xs = [Math.floor(x0) - 1, Math.floor(x0), Math.floor(x0) + 1]
      .filter(x => x >= 0 && x < w);
    sides++; if (xs.some(x => diff(x, y))) traced++;
  }
}
return [w, h, changed, outside, sides, traced];
"""


def _rows(browser) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")]


def test_the_page_uploads_an_image_and_draws_its_boxes_and_rows(server, browser, toy_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = sorted((toy_root / "JPEGImages").glob("*.jpg"))[0]
    browser.get(server)
    assert browser.find_element(By.ID, "ebui").is_selected()  # the run has an energy fit
    # Every detection of the untrained model is shown at a minimum score of 0.
    browser.execute_script("const s = document.getElementById('score'); s.value = '0';"
                           "s.dispatchEvent(new Event('input'));")
    browser.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(browser, 60).until(lambda d: _rows(d))
    rows = _rows(browser)
    record = browser.execute_script("return record")
    assert len(rows) == len(record["boxes"]) > 0
    for i, row in enumerate(rows):
        assert row[1] == record["labels"][i] and row[4] in ("known", "unknown")
        assert float(row[2]) == pytest.approx(record["scores"][i], abs=5e-4)
        assert float(row[3]) == pytest.approx(record["energies"][i], abs=5e-3)
    w, h, changed, outside, sides, traced = browser.execute_script(_DIFF)
    assert (w, h) == (record["width"], record["height"])
    assert changed > 20 and outside == 0  # drawn, and nowhere but around the listed boxes
    assert sides > 0 and traced >= 0.9 * sides  # each box's outline runs along its sides
    assert browser.find_element(By.ID, "error").text == ""

    # A minimum score above every detection hides every row and every box.
    browser.execute_script("const s = document.getElementById('score'); s.value = '1';"
                           "s.dispatchEvent(new Event('input'));")
    assert _rows(browser) == [] and browser.execute_script(_DIFF)[2] == 0

    # Switching EBUI off asks again: the answer carries no energies.
    browser.execute_script("const s = document.getElementById('score'); s.value = '0';"
                           "s.dispatchEvent(new Event('input'));")
    browser.find_element(By.ID, "ebui").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script("return record && !('energies' in record)"))
    WebDriverWait(browser, 10).until(lambda d: _rows(d))
    assert all(row[3] == "" for row in _rows(browser))


def test_a_non_image_shows_the_servers_reason(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    browser.get(server)
    browser.find_element(By.ID, "file").send_keys(str(notes))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert "notes.png: not a decodable image" in browser.find_element(By.ID, "error").text
    assert _rows(browser) == []
