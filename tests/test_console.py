"""The web console in a real browser: Debian's headless Chromium, driven by selenium through
Debian's chromium-driver (matched to the browser by the distribution; nothing is downloaded),
against a real edgellm on loopback with tiny models. Screenshots of each page, at desktop and
phone width, go to tests/artifacts/console/."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
from collections.abc import Iterator

import httpx
import pytest
from conftest import ROOT, wait_until
from test_cli import edgellm
from tiny_models import CHATML, write_model

from edgellm.store.registry import Registry

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromium-driver are not installed "
                                                                  "(make test installs them as root)")
API_KEY, ADMIN_KEY = "console-user-key", "console-admin-key"
ARTIFACTS = ROOT / "tests" / "artifacts" / "console"
WEB = ROOT / "edgellm" / "web"


@pytest.fixture(scope="module")
def site(tmp_path_factory, models) -> dict:
    d = tmp_path_factory.mktemp("console")
    state = d / "state"
    registry = Registry(state).open()
    registry.add(models["scripted"])  # " tick tock" forever: a reply to stop
    registry.add(write_model(d / "chat.gguf", seed=4, chat_template=CHATML))
    assert edgellm("keygen", "-o", str(d / "site")).returncode == 0
    (state / "trusted-keys").mkdir()
    shutil.copy(d / "site.pub", state / "trusted-keys")
    good = d / "good.tar"
    made = edgellm("bundle", "create", str(write_model(d / "from-the-stick.gguf", seed=8)), "-o", str(good),
                   "--key", str(d / "site.key"))
    assert made.returncode == 0, made.stderr
    tampered = d / "tampered.tar"
    data = bytearray(good.read_bytes())
    at = data.find(b'"from-the-stick"')
    data[at + 1:at + 5] = b"FROM"  # the manifest no longer matches its signature
    tampered.write_bytes(bytes(data))
    (d / "opt").mkdir()  # the last software update's outcome, as edgellm/update/layout.py records it
    (d / "opt" / "status.json").write_text(json.dumps({
        "state": "rolled-back", "from": "0.1.0", "to": "0.2.0", "at": "2026-12-02T05:00:00Z",
        "message": "rolled back to 0.1.0: 0.2.0 <b>did not answer /health</b>"}))
    return {"state": state, "good": good, "tampered": tampered, "update_root": d / "opt"}


@pytest.fixture(scope="module")
def server(server_factory, site):
    config = (f'[server]\napi_keys = ["{API_KEY}"]\nadmin_keys = ["{ADMIN_KEY}"]\n'
              f'[update]\nroot = "{site["update_root"]}"\n')
    return server_factory(None, state_dir=site["state"], config=config, api_key=API_KEY)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
                 "--host-resolver-rules=MAP rebind.test 127.0.0.1, MAP elsewhere.test 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def by_id(browser, name: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, name)


def errors(browser) -> list[dict]:
    """The browser's console errors since the last call."""
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def shoot(browser, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width, label in ((1200, "desktop"), (375, "phone")):
        browser.set_window_size(width, 900)
        browser.save_screenshot(str(ARTIFACTS / f"{name}-{label}.png"))
    browser.set_window_size(1200, 900)


def open_console(browser, server, page: str, *, api_key: str = API_KEY, admin_key: str = ADMIN_KEY) -> None:
    browser.get(f"{server.url}/#{page}")
    by_id(browser, "api-key").send_keys(api_key)
    by_id(browser, "admin-key").send_keys(admin_key)
    by_id(browser, "keys").submit()


def figure(browser, name: str) -> str:
    values = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#status-figures dd')]"
        ".map(d => [d.dataset.figure, d.textContent]))")
    return values.get(name, "")


def test_the_console_is_small_strict_and_needs_no_other_origin(server):
    total = sum(p.stat().st_size for p in WEB.iterdir() if p.suffix in (".html", ".js", ".css"))
    assert total < 150_000, f"{total} bytes"
    html = (WEB / "index.html").read_text()
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))  # no inline script
    assert not re.search(r"(https?:)?//", html.replace("http://www.w3.org", ""))  # nothing from elsewhere
    for path in ("/", "/console/console.js", "/console/console.css"):
        r = httpx.get(server.url + path, headers={"Accept": "text/html"})
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(server.url + "/").text == "Ollama is running"  # not a browser: Ollama's clients
    for sneaky in ("/console/%2e%2e%2fpyproject.toml", "/console/__init__.py", "/console/.hidden.js"):
        r = httpx.get(server.url + sneaky)
        assert r.status_code in (401, 404) and "[project]" not in r.text and "package data" not in r.text


def test_status_shows_live_figures(browser, server):
    open_console(browser, server, "status")
    wait_until(lambda: figure(browser, "Health") == "ok" and figure(browser, "Version"), 10, message="the figures")
    before = int(figure(browser, "Tokens generated") or 0)
    server.post("/v1/completions", {"model": "scripted", "prompt": " tick", "max_tokens": 50, "temperature": 0})
    wait_until(lambda: int(figure(browser, "Tokens generated") or 0) >= before + 50, 10, message="a live update")
    assert "used" in figure(browser, "Memory") and figure(browser, "Backend").startswith("cpu")
    assert figure(browser, "GPU") == "none" and figure(browser, "CPU")
    # The last update, as text (its message is the box's own, never markup).
    assert figure(browser, "Last update") == ("rolled-back: rolled back to 0.1.0: 0.2.0 <b>did not answer /health</b> "
                                              "(2026-12-02T05:00:00Z)")
    shoot(browser, "status")
    assert errors(browser) == []


def test_a_chat_streams_and_stops(browser, server):
    from selenium.webdriver.support.ui import Select

    open_console(browser, server, "chat")
    wait_until(lambda: "scripted" in by_id(browser, "chat-model").text, 10, message="the model list")
    Select(by_id(browser, "chat-model")).select_by_visible_text("scripted")
    by_id(browser, "chat-plain").click()  # a base model: plain text completion
    by_id(browser, "chat-max").clear()
    by_id(browser, "chat-max").send_keys("4000")
    by_id(browser, "chat-input").send_keys(" tick")
    by_id(browser, "chat-send").click()
    wait_until(lambda: "tock tick" in by_id(browser, "chat-log").text, 10, message="streamed text")
    wait_until(lambda: "tokens/s" in by_id(browser, "chat-stats").text, 10, message="the speed")
    assert "First token after" in by_id(browser, "chat-stats").text
    by_id(browser, "chat-stop").click()
    wait_until(lambda: "(stopped)" in by_id(browser, "chat-log").text, 10, message="the stop")
    assert by_id(browser, "chat-log").text.count("tock") < 2000  # stopped before max tokens
    shoot(browser, "chat")
    assert errors(browser) == []


def test_upload_shows_progress_and_the_model_appears_and_a_tampered_bundle_says_why(browser, server, site):
    open_console(browser, server, "import")
    by_id(browser, "bundle-file").send_keys(str(site["tampered"]))
    by_id(browser, "import-form").submit()
    wait_until(lambda: "Refused" in by_id(browser, "import-result").text, 20, message="the refusal")
    assert "signature" in by_id(browser, "import-result").text
    by_id(browser, "bundle-file").send_keys(str(site["good"]))
    by_id(browser, "import-form").submit()
    wait_until(lambda: "Imported" in by_id(browser, "import-result").text, 30, message="the import")
    assert "from-the-stick (installed)" in by_id(browser, "import-result").text
    assert browser.execute_script("return document.getElementById('import-progress').value") > 0
    wait_until(lambda: "from-the-stick" in by_id(browser, "import-history").text, 10, message="the history")
    assert "refused" in by_id(browser, "import-history").text
    shoot(browser, "import")
    browser.get(f"{server.url}/#models")
    wait_until(lambda: "from-the-stick" in by_id(browser, "models-list").text, 10, message="the new model")
    assert errors(browser) == []


def test_load_and_unload_change_the_state(browser, server):
    open_console(browser, server, "models")
    row = "document.querySelector(\"tr[data-model='chat']\")"

    def state() -> str:  # read in one script: the table is drawn afresh after each action
        return browser.execute_script(f"const r = {row}; "
                                      "return r ? r.querySelector('td[data-state]').dataset.state : ''")

    def press(label: str) -> None:
        assert browser.execute_script(
            f"const b = [...({row}).querySelectorAll('button')].find(b => b.textContent === arguments[0]);"
            "if (b) b.click(); return !!b;", label)

    wait_until(state, 10, message="the models table")
    press("Load")
    wait_until(lambda: state() == "loaded", 20, message="loaded")
    assert "generic" in browser.execute_script(f"return ({row}).textContent")  # its tool-call format, once loaded
    shoot(browser, "models")
    press("Unload")
    wait_until(lambda: state() == "unloaded", 20, message="unloaded")
    assert errors(browser) == []


def test_the_pages_work_from_the_keyboard(browser, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{server.url}/#status")
    for _ in range(10):  # Tab until the Chat link has the focus, then Enter
        ActionChains(browser).send_keys(Keys.TAB).perform()
        if browser.execute_script("return document.activeElement.getAttribute('href')") == "#chat":
            break
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait_until(lambda: browser.execute_script("return location.hash") == "#chat", 5, message="the chat page")
    # The page shows once the hashchange handler has run (after the hash itself changes).
    wait_until(lambda: browser.execute_script("return document.getElementById('page-chat').hidden") is False, 5,
               message="the chat page shown")
    labels = browser.execute_script("return [...document.querySelectorAll('input, select, textarea')]"
                                    ".filter(e => !e.closest('label')).map(e => e.id)")
    assert labels == []  # every control has its label
    browser.get_log("browser")  # (no key given here: the status page's 401s are expected)


def test_a_wrong_key_says_so_and_keys_stay_out_of_urls_cookies_and_the_page(browser, server):
    open_console(browser, server, "status", api_key="not-the-key", admin_key="")
    wait_until(lambda: "key was not accepted" in by_id(browser, "message").text, 10, message="the message")
    browser.get_log("browser")  # (its 401s are the point here)
    open_console(browser, server, "connect")
    wait_until(lambda: by_id(browser, "connect-url").text, 10, message="the connect page")
    assert by_id(browser, "connect-url").text == server.url + "/v1"
    assert "needed" in by_id(browser, "connect-key").text and "ollama" in by_id(browser, "snippet-ollama").text
    assert browser.execute_script("return document.cookie") == ""
    page = browser.execute_script("return document.documentElement.outerHTML")
    assert API_KEY not in page and ADMIN_KEY not in page and API_KEY not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('edgellm.api-key')") == API_KEY
    shoot(browser, "connect")
    assert errors(browser) == []


def test_a_rebinding_name_and_a_page_elsewhere_cannot_drive_the_box(browser, server):
    port = server.url.rsplit(":", 1)[1]
    browser.get(f"http://rebind.test:{port}/")  # a name of someone else's that resolves to the box
    assert "not one of this box's names" in browser.find_element("tag name", "body").text

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = b"<!doctype html><title>elsewhere</title>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://elsewhere.test:{other.server_address[1]}/")
        outcome = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const key = {'Authorization': 'Bearer ' + arguments[1]};
            fetch(arguments[0] + '/admin/models/chat/load', {method: 'POST', headers: key})
              .then(r => done('answered ' + r.status), e => done('blocked'));
        """, server.url, ADMIN_KEY)
        assert outcome == "blocked"
        simple = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch(arguments[0] + '/admin/models/chat/load', {method: 'POST', mode: 'no-cors'})
              .then(() => done('sent'), () => done('blocked'));
        """, server.url)
        assert simple in ("sent", "blocked")
    finally:
        other.shutdown()
        other.server_close()
    models = server.get("/admin/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    assert next(m for m in models if m["id"] == "chat")["state"] != "loaded"  # neither request loaded it
    browser.get_log("browser")  # (the blocked fetches are logged: that is what was tested)


def test_the_console_reports_what_it_measured_to_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert "docs/console-status.png" in readme and (ROOT / "docs" / "console-status.png").exists()


def test_imports_from_sticks_are_in_the_history_too(site, tmp_path):
    """The USB import units run `edgellm bundle import`: its outcomes reach the Import page's list."""
    from edgellm.bundles import history

    state = tmp_path / "state"
    shutil.copytree(site["state"] / "trusted-keys", state / "trusted-keys")
    assert edgellm("bundle", "import", str(site["tampered"]), "--state-dir", str(state)).returncode != 0
    assert edgellm("bundle", "import", str(site["good"]), "--state-dir", str(state)).returncode == 0
    latest, refused = history.read(state)[:2]
    assert latest["outcome"] == "imported" and latest["models"] == [{"id": "from-the-stick", "status": "installed"}]
    assert latest["source"].endswith("good.tar") and refused["outcome"].startswith("refused: ")
