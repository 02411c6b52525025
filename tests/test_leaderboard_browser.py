"""A real browser (Debian chromium, driven by Playwright) uploads a submission, waits for its row on
the board, opens its submission page and saves a screenshot. Never downloads a browser."""

from __future__ import annotations

import os
import shutil

import pytest

from leaderboard_helpers import GOLD, RESULT, free_port, small_limits

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def chromium():
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} is not installed")
    pytest.importorskip("playwright.sync_api")
    return CHROMIUM


def test_upload_row_and_submission_page_in_chromium(tmp_path, chromium, capsys):
    from playwright.sync_api import expect, sync_playwright

    from leaderboard.app import launch
    from leaderboard.chat import ChatService
    from leaderboard.config import LeaderboardConfig
    from leaderboard.service import LeaderboardService

    cfg = LeaderboardConfig(gold=GOLD, db_url=f"sqlite:///{tmp_path}/lb.db", limits=small_limits(),
                            reference_access="full", compute_baselines=False)
    service = LeaderboardService(cfg)
    service.ensure_baselines()
    demo, url = launch(service, ChatService([]), host="127.0.0.1", port=free_port(), block=False,
                       quiet=True)
    upload = tmp_path / "result.json"
    shutil.copy(RESULT, upload)
    shot = tmp_path / "submission_page.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(url)
            # the board is there, with the four baselines
            expect(page.locator("#lb-table").get_by_role("gridcell").filter(has_text="generic")
                   .first).to_be_visible()
            page.get_by_role("tab", name="Submit").click()
            page.locator("#lb-upload input[type=file]").set_input_files(str(upload))
            expect(page.locator("#lb-upload").get_by_text("result.json").first).to_be_visible()
            page.locator("#lb-team").get_by_role("textbox").fill("Browser Team")
            page.locator("#lb-system").get_by_role("textbox").fill("chromium-run")
            page.locator("#lb-submit").click()
            expect(page.locator("#lb-status")).to_contain_text("Accepted", timeout=60_000)
            status = page.locator("#lb-status").inner_text()
            assert "rank 1" in status
            # the row appears on the board; clicking it opens the submission page
            page.get_by_role("tab", name="Leaderboard").click()
            cell = page.locator("#lb-table").get_by_role("gridcell").filter(has_text="Browser Team").first
            expect(cell).to_be_visible()
            cell.click()
            header = page.locator("#lb-sub-header")
            expect(header).to_contain_text("Submission #5")
            expect(header).to_contain_text("Browser Team")
            expect(page.get_by_text("Per-turn scores, worst first")).to_be_visible()
            page.screenshot(path=str(shot), full_page=True)
            # a submission page has its own address
            page.goto(url.rstrip("/") + "/?submission=1")
            expect(page.locator("#lb-sub-header")).to_contain_text("Submission #1")
            expect(page.locator("#lb-sub-header")).to_contain_text("baseline")
            browser.close()
    finally:
        demo.close()
        service.close()
    assert shot.exists() and shot.stat().st_size > 20_000
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with capsys.disabled():
        print(f"\nscreenshot of the submission page: {shot}")
