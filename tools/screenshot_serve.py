#!/usr/bin/env python
"""A screenshot of ``ore serve``'s page for the README: the page of a run's model in
headless Chromium (Debian's ``chromium`` + ``chromium-driver``), one image uploaded.

    python tools/screenshot_serve.py --run runs/demo/ore --image IMG --output docs/img/serve.png
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ore.cli import parse_args
from ore.cli.detect import model_source
from ore.engine.inference import Predictor
from ore.engine.serve import build_app
from ore.fileio import atomic_write


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--size", default="1280,860", help="window width,height")
    a = p.parse_args()
    for path in (a.run, a.image):
        if not Path(path).exists():
            print(f"error: {path}: not found", file=sys.stderr)
            return 2
    args = parse_args(["serve", "--run", a.run])
    cfg, weights = model_source(args, args.overrides)
    app = build_app(Predictor(cfg, weights))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={a.size}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "file").send_keys(str(Path(a.image).resolve()))
        WebDriverWait(driver, 60).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#table tbody tr"))
        time.sleep(0.5)
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
        srv.should_exit = True
        thread.join(timeout=10)
    atomic_write(a.output, lambda f: f.write(png))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
