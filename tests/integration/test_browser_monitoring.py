"""The monitoring page in a real browser (headless Debian Chromium through Selenium): a real
``serve`` audits a study (fake grounder), its signed final report arrives in ``finals/``, and the
page reached from the navigation shows the agreement. Screenshot to ``$CXR_AGENT_SCREENSHOTS``
(``docs/img`` for docs/monitoring.md) when set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_browser import (  # noqa: F401 - browser is a fixture
    browser,
    click_to_next_page,
    full_page,
    shots,
)
from tests.support.agentproc import AgentProcess, make_study, running_agent, store, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with running_agent(tmp_path / "agent", {"monitoring": {"poll_seconds": 0.2}}) as proc:
        yield proc


def test_monitoring_page_after_a_final_report(
    agent: AgentProcess,
    browser: object,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    study = make_study(1, accession="MON-BRW", size=512)  # bright: pneumothorax + effusion
    assert store(agent.port, study) == [0]
    agent.drop_draft("MON-BRW.txt", "Small right pleural effusion. No pneumothorax.")
    wait_until(lambda: agent.result(str(study[0].StudyInstanceUID)), timeout=120,
               what="the audit", alive=agent.check_alive)
    finals = agent.path("finals")
    finals.mkdir(parents=True, exist_ok=True)
    (finals / "MON-BRW.part").write_text("Left pneumothorax. Right pleural effusion.")
    (finals / "MON-BRW.part").rename(finals / "MON-BRW.txt")
    wait_until(lambda: agent.db_query("SELECT id FROM finals WHERE state = 'compared'"),
               timeout=60, what="the compared final", alive=agent.check_alive)

    driver.get(agent.health_url + "/")  # type: ignore[attr-defined]
    click_to_next_page(driver, driver.find_element(By.LINK_TEXT, "Monitoring"))
    assert "RESEARCH USE ONLY" in driver.find_element(By.ID, "research-banner").text  # type: ignore[attr-defined]
    rows = {r.find_elements(By.TAG_NAME, "td")[1].text: r.text  # type: ignore[attr-defined]
            for r in driver.find_elements(By.CSS_SELECTOR, "#agreement tbody tr")}  # type: ignore[attr-defined]
    assert len(rows) == 5
    assert "1.000 [0.21-1.00] n=1" in rows["Pneumothorax"]  # the model found it
    assert "0.000 [0.00-0.79] n=1" in rows["Pneumothorax"]  # the draft denied it
    flags = driver.find_element(By.ID, "flag-confirmation").text  # type: ignore[attr-defined]
    assert "missing" in flags and "urgent" in flags
    full_page(driver, shots(tmp_path) / "browser-monitoring.png")
