"""The web console in a real browser: Debian's headless Chromium, driven by
Selenium through chromium-driver, against the installed ``twistd kvconfig``
(and a real ``twistd kvconfig-agent``).

The tests skip without ``chromium`` and ``chromedriver`` unless
``KVCONFIG_REQUIRE_TOOLS`` is set (``.ci/run`` sets it, and
``.ci/install-tools`` installs them).  Each test saves screenshots under its
tmp dir; with ``KVCONFIG_UPDATE_SCREENSHOT=1`` the subscriptions test also
writes ``docs/console.png``, the README's picture.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_e2e import AgentProcess, read_json, wait_for

from serverprocess import KVConfigProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: Without these Chromium hangs here on its background connections.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,1100")
README_PICTURE = Path(__file__).resolve().parent.parent / "docs" / "console.png"
WAIT = 20.0


def require_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        why = f"no {' or '.join(missing)} (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("KVCONFIG_REQUIRE_TOOLS"):
            pytest.fail(f"KVCONFIG_REQUIRE_TOOLS is set but there is {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[KVConfigProcess]:
    """A server whose subscribers renew every 2 s (a 6 s lease), so the
    revision an agent applied shows within a few seconds."""
    process = KVConfigProcess(tmp_path_factory.mktemp("console"), None,
                              "--heartbeat-seconds=1", "--lease-seconds=6")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def until(browser, condition, what: str, timeout: float = WAIT):
    """Wait for *condition(browser)*; on failure say what, with the page's
    messages."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        messages = [element.text for element in browser.find_elements(
            "css selector", ".message, #key-count, #summary")]
        raise AssertionError(f"timed out waiting for {what}; the page says {messages}") \
            from None


def open_console(browser, server: KVConfigProcess) -> None:
    browser.get(server.http_url + "/ui/")
    until(browser, lambda b: b.find_element("id", "live").text == "live",
          "the live watch to start")


def key_link(browser, key: str):
    found = browser.find_elements("css selector", f'a[data-key="{key}"]')
    return found[0] if found else None


def select_key(browser, key: str, shows: str) -> None:
    until(browser, lambda b: key_link(b, key), f"{key} in the tree").click()
    until(browser, lambda b: b.find_element("id", "value").get_attribute("value") == shows,
          f"{key}'s value in the editor")


def edit(browser, text: str) -> None:
    area = browser.find_element("id", "value")
    area.clear()
    area.send_keys(text)


def test_a_key_written_over_xmlrpc_appears_without_a_reload(browser, server, tmp_path):
    open_console(browser, server)
    browser.execute_script("window.notReloaded = true;")
    assert key_link(browser, "console/live/new") is None
    server.proxy().save("console/live/new", {"written": "over XML-RPC"})
    until(browser, lambda b: key_link(b, "console/live/new"), "the new key in the tree")
    assert browser.execute_script("return window.notReloaded === true;")
    assert "console/" in browser.find_element("id", "tree").text
    browser.save_screenshot(str(tmp_path / "live-key.png"))


def test_an_edit_in_the_page_is_read_back_over_xmlrpc(browser, server, tmp_path):
    proxy = server.proxy()
    proxy.save("console/edit/db", "10.0.0.1")
    open_console(browser, server)
    select_key(browser, "console/edit/db", '"10.0.0.1"')
    edit(browser, '{"host": "10.0.0.9", "ports": [5432, 5433]}')
    browser.find_element("id", "save").click()
    until(browser, lambda b: "Saved at revision" in b.find_element("id", "key-message").text,
          "the save to be acknowledged")
    assert proxy.load("console/edit/db") == {"host": "10.0.0.9", "ports": [5432, 5433]}
    browser.save_screenshot(str(tmp_path / "edited.png"))


def test_a_stale_edit_shows_the_conflict_and_does_not_overwrite(browser, server, tmp_path):
    proxy = server.proxy()
    proxy.save("console/race/flag", "from the page's start")
    open_console(browser, server)
    select_key(browser, "console/race/flag", '"from the page\'s start"')
    edit(browser, '"the page\'s edit"')
    proxy.save("console/race/flag", "written meanwhile over XML-RPC")
    until(browser, lambda b: b.find_element("id", "remote-change").is_displayed(),
          "the page to say the key changed on the server")
    browser.find_element("id", "save").click()
    until(browser, lambda b: "conflict" in b.find_element("id", "key-message")
          .get_attribute("class"), "the conflict")
    assert "Your edit was not saved" in browser.find_element("id", "key-message").text
    assert browser.find_element("id", "value").get_attribute("value") == '"the page\'s edit"'
    assert proxy.load("console/race/flag") == "written meanwhile over XML-RPC"
    browser.save_screenshot(str(tmp_path / "conflict.png"))
    # The way out: load the current value, then edit that.
    browser.find_element("id", "load-current").click()
    until(browser, lambda b: b.find_element("id", "value").get_attribute("value")
          == '"written meanwhile over XML-RPC"', "the current value")


def test_the_subscriptions_table_shows_an_agents_applied_revision(browser, server, tmp_path):
    """A real agent keeps a file of console/app/; the table shows its
    subscription with the revision its file holds, lag 0, and the lag when
    the agent stops applying (frozen) while the store moves on."""
    config = tmp_path / "app.json"
    agent = AgentProcess(tmp_path, "agent", server, "console/app/", f"--output={config}",
                         "--debounce=0.05")
    agent.start()
    try:
        proxy = server.proxy()
        proxy.save("console/app/db/host", "10.0.0.5")
        proxy.save("console/app/db/port", 5432)
        wait_for(lambda: (read_json(config) or {}).get("console/app/db/port") == 5432,
                 "the agent's file", logs=agent.log)
        open_console(browser, server)

        def row():
            # Read in one script: the table is redrawn every two seconds.
            return browser.execute_script("""
                const tr = document.querySelector(
                    '#subscriptions tbody tr[data-prefix="console/app/"]');
                if (!tr) return null;
                const row = {};
                for (const td of tr.cells) row[td.className.split(" ")[0]] = td.textContent;
                row.behind = !!tr.querySelector("td.behind");
                return row;""")

        revision = proxy.stats()["revision"]
        until(browser, lambda b: (r := row()) and r["applied"] == str(revision)
              and r["lag"] == "0", f"the agent's row at revision {revision}")
        assert row()["address"].startswith("127.0.0.1:")
        select_key(browser, "console/app/db/host", '"10.0.0.5"')
        browser.save_screenshot(str(tmp_path / "subscriptions.png"))
        if os.environ.get("KVCONFIG_UPDATE_SCREENSHOT"):
            README_PICTURE.parent.mkdir(exist_ok=True)
            browser.save_screenshot(str(README_PICTURE))
        # Frozen, the agent applies nothing while the store moves on: lag.
        agent.process.send_signal(signal.SIGSTOP)
        try:
            proxy.save("console/app/db/port", 5433)
            proxy.save("console/other", 1)
            until(browser, lambda b: (r := row()) and r["lag"] == "2" and r["behind"],
                  "a lag of 2, marked")
        finally:
            agent.process.send_signal(signal.SIGCONT)
        until(browser, lambda b: (r := row()) and r["lag"] == "0", "the agent caught up")
    finally:
        agent.stop()
