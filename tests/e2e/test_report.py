"""`edgesplit audit` as a user runs it, and its report.html in a real (headless) browser."""
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cmd = [sys.executable, "-m", "edgesplit", "audit", "tiny-cnn", "--cuts", "conv1", "pool1", "dense2",
           "--n", "100", "--iters", "60", "--attack-n", "6", "--decoder-epochs", "2", "--max-bytes", "2000",
           "--seed", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_the_command_prints_a_table_and_a_recommendation(report_dir):
    _, stdout = report_dir
    assert "recommended cut: pool1" in stdout or "recommended cut: dense2" in stdout
    for cut in ("conv1", "pool1", "dense2"):
        assert re.search(rf"^{cut}\s", stdout, re.M), stdout
    assert "log2 N = 6.6439" in stdout                      # the ceiling for N = 100 is printed
    assert "report.html" in stdout


def test_report_html_is_self_contained(report_dir):
    out, _ = report_dir
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the report must not load anything"
    assert page.count("data:image/png;base64,") == 5  # grid, plane, cost, measures, sigma^2 bands
    assert "Recommended cut" in page and "saturated" in page


def test_a_bad_cut_exits_2_with_the_valid_cuts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgesplit", "audit", "tiny-cnn", "--cuts", "conv9", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "conv9" in done.stderr and "pool1" in done.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    from PIL import Image

    out, _ = report_dir
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1280,2400", (out / "report.html").resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=180, check=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    # Not blank: many colours, and a good share of the page is ink, not background.
    colours = np.unique(img.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 200
    ink = (img.min(axis=2) < 200).mean()
    assert ink > 0.05, f"only {ink:.1%} of the page is drawn"
    # The reconstruction grid's images (dark digits' backgrounds) are on the page: dark square areas exist.
    dark = (img.max(axis=2) < 40).mean()
    assert dark > 0.01, f"only {dark:.1%} of the page is dark: the grid is missing"
    shutil.copy(shot, out / "screenshot.png")
