"""The results browser in a real browser: Debian's Chromium, headless, driven by Selenium.

A real ``cxr-agent serve`` (fake grounder) receives two studies over C-STORE and their drafts;
the browser opens the studies list, clicks through to the flagged study, checks the overlay,
the flags and the draft spans, then runs an upload audit and checks the verdict and overlay.
Screenshots go to ``$CXR_AGENT_SCREENSHOTS`` when set (``docs/img`` for docs/browser.md), else
to the test's temporary folder. No browser is downloaded: the test is skipped when
``/usr/bin/chromium`` or ``/usr/bin/chromedriver`` is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_agent.web.audit_one import EXAMPLES, example_picture
from tests.support.agentproc import AgentProcess, make_study, running_agent, store, wait_until

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DARK = (3000.0, 1000.0)  # a window that makes the phantom dark: the fake grounder sees nothing


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed (scripts/setup.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    # a form post (the upload audit) may still be loading when the next lookup runs, above all
    # on a loaded CI machine: lookups wait for their element instead of failing at once
    driver.implicitly_wait(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with running_agent(tmp_path / "agent") as proc:
        yield proc


def click_to_next_page(driver: object, element: object) -> None:
    """Click a link or submit button and wait until the browser has left the current page, so
    the next lookups read the new page, never the old one (stale elements under load)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old_page = driver.find_element(By.TAG_NAME, "html")  # type: ignore[attr-defined]
    element.click()  # type: ignore[attr-defined]
    WebDriverWait(driver, 60).until(expected_conditions.staleness_of(old_page))


def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CXR_AGENT_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def full_page(driver: object, path: Path) -> None:
    """A screenshot as tall as the page (headless Chromium draws the window size only)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")  # type: ignore[attr-defined]
    driver.set_window_size(1280, min(max(int(height) + 40, 700), 3000))  # type: ignore[attr-defined]
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    driver.set_window_size(1280, 1000)  # type: ignore[attr-defined]


def test_list_to_study_and_an_upload_audit(
    agent: AgentProcess, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    flagged = make_study(1, accession="BRW-FLAG", size=512)  # bright: pneumothorax + effusion
    normal = make_study(1, accession="BRW-NORM", size=512, window=DARK)
    assert store(agent.port, flagged) == [0]
    assert store(agent.port, normal) == [0]
    agent.drop_draft("BRW-FLAG.txt", "Small right pleural effusion. No pneumothorax.")
    agent.drop_draft("BRW-NORM.txt", "Normal chest radiograph. No pleural effusion.")
    flagged_uid = str(flagged[0].StudyInstanceUID)
    for uid in (flagged_uid, str(normal[0].StudyInstanceUID)):
        wait_until(lambda u=uid: agent.result(u), timeout=120, what="both audits",
                   alive=agent.check_alive)
    folder = shots(tmp_path)
    base = agent.health_url

    driver.get(base + "/")  # type: ignore[attr-defined]
    assert "RESEARCH USE ONLY" in driver.find_element(By.ID, "research-banner").text  # type: ignore[attr-defined]
    rows = driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr")  # type: ignore[attr-defined]
    texts = [r.text for r in rows]
    assert len(rows) == 2 and any("BRW-FLAG" in t and "URGENT" in t for t in texts)
    assert any("BRW-NORM" in t and "URGENT" not in t and "audited" in t for t in texts)
    full_page(driver, folder / "browser-studies.png")
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "flag-filter")).select_by_value("urgent")  # type: ignore[attr-defined]
    click_to_next_page(driver, driver.find_element(By.CSS_SELECTOR, "form.filters button"))
    shown = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr")]  # type: ignore[attr-defined]
    assert len(shown) == 1 and "BRW-FLAG" in shown[0]

    click_to_next_page(driver, driver.find_element(By.LINK_TEXT, "BRW-FLAG"))
    assert flagged_uid in driver.find_element(By.ID, "study-uid").text  # type: ignore[attr-defined]
    overlay = driver.find_element(By.CSS_SELECTOR, "img.overlay")  # type: ignore[attr-defined]
    assert driver.execute_script("return arguments[0].naturalWidth", overlay) > 0  # type: ignore[attr-defined]
    flags = driver.find_element(By.ID, "flags").text  # type: ignore[attr-defined]
    assert "URGENT" in flags and "pneumothorax" in flags
    spans = [m.get_attribute("title") for m in driver.find_elements(By.CSS_SELECTOR, "mark.span")]  # type: ignore[attr-defined]
    assert "pleural_effusion (present)" in spans and "pneumothorax (absent)" in spans
    assert "urgent" in driver.find_element(By.ID, "legend").text  # type: ignore[attr-defined]
    assert "audit job" in driver.find_element(By.ID, "timeline").text  # type: ignore[attr-defined]
    full_page(driver, folder / "browser-study.png")

    picture = tmp_path / "upload.png"
    example_picture(EXAMPLES["missed-nodule"]).save(picture)
    click_to_next_page(driver, driver.find_element(By.LINK_TEXT, "Audit one image"))
    driver.find_element(By.ID, "image").send_keys(str(picture))  # type: ignore[attr-defined]
    driver.find_element(By.ID, "draft").send_keys(  # type: ignore[attr-defined]
        "The lungs are clear. No pleural effusion or pneumothorax.")
    click_to_next_page(driver, driver.find_element(By.ID, "run"))
    verdict = driver.find_element(By.ID, "verdict").text  # type: ignore[attr-defined]
    assert "URGENT" in verdict and "MISSING" in verdict
    shown = driver.find_element(By.ID, "overlay")  # type: ignore[attr-defined]
    assert driver.execute_script("return arguments[0].naturalWidth", shown) == 512  # type: ignore[attr-defined]
    assert "pneumothorax" in driver.find_element(By.ID, "findings").text  # type: ignore[attr-defined]
    full_page(driver, folder / "browser-audit.png")

    click_to_next_page(driver, driver.find_element(By.LINK_TEXT, "Queue"))
    assert "2 done" in driver.find_element(By.TAG_NAME, "main").text  # type: ignore[attr-defined]
    bars = driver.find_elements(By.CSS_SELECTOR, "#throughput rect.bar-done")  # type: ignore[attr-defined]
    assert len(bars) == 12
    full_page(driver, folder / "browser-queue.png")


#: The metric lines docs/browser.md quotes.
EXCERPT = ("jobs{state=\"done\"}", "model_available", "audit_seconds_count", "stage_seconds_count",
           "stage_seconds_sum", "flags_total", "associations", "bytes_received")


def test_health_and_metrics_of_a_running_agent(agent: AgentProcess) -> None:
    """/readyz and the listener's counters in /metrics, from a real serve process."""
    import httpx

    from tests.support.agentproc import echo

    study = make_study(2, accession="MET-1", size=256)
    assert store(agent.port, study) == [0, 0]
    assert echo(agent.port, called_aet="NOT-US") is None  # rejected: wrong called AE title
    agent.drop_draft("MET-1.txt", "Small right pleural effusion. No pneumothorax.")
    wait_until(lambda: agent.result(str(study[0].StudyInstanceUID)), timeout=120, what="audit",
               alive=agent.check_alive)
    samples = {}
    excerpt = []
    for line in httpx.get(agent.health_url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
            if not name.endswith("_created") and any(part in name for part in EXCERPT):
                excerpt.append(line)
    print("\n" + "\n".join(excerpt))  # the excerpt in docs/browser.md (-s shows it)
    pixel_bytes = sum(len(ds.PixelData) for ds in study)
    assert samples["cxr_agent_bytes_received_total"] > pixel_bytes
    assert samples["cxr_agent_associations_rejected_total"] == 1
    assert samples["cxr_agent_associations_active"] == 0
    assert samples['cxr_agent_flags_total{kind="urgent"}'] == 1
    assert samples['cxr_agent_stage_seconds_count{stage="decode"}'] == 1
    ready = httpx.get(agent.health_url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"]["model"]["ok"] is True
