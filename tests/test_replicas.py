"""Past one machine: two dashboard replicas behind nginx (deploy/serve.py, what `make serve` runs),
real Chromium tabs through the balancer, and one replica killed mid-session.

Tabs on http://127.0.0.1:P and on http://localhost:P have separate cookie jars; each jar gets a
sticky cookie that nginx hashes to a different replica, so both replicas serve tabs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from benchmarks import tabs
from tests.conftest import DEFAULT_CKPT, ROOT

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(NGINX is None, reason="Debian's nginx is not installed (.ci/run installs it)"),
    pytest.mark.skipif(not tabs.HAVE_BROWSER,
                       reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)"),
    pytest.mark.skipif(not DEFAULT_CKPT.exists(), reason="no default checkpoint"),
]


def replica_of(url: str, cookie: str) -> str:
    """The replica (127.0.0.1:port) nginx sends a browser with this sticky cookie to."""
    req = urllib.request.Request(url + "/_stcore/health", headers={"Cookie": f"visattn_replica={cookie}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers["X-Visattn-Replica"].split(",")[-1].strip()


@pytest.fixture()
def balancer(tmp_path: Path):
    state = tmp_path / "state.json"
    port = tabs.free_port()
    proc = subprocess.Popen([sys.executable, "deploy/serve.py", "--replicas", "2", "--port", str(port), "--nginx", NGINX,
                             "--state", str(state)], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        tabs.wait_for(lambda: state.is_file() or proc.poll() is not None, 240, "the replicas and nginx")
        assert proc.poll() is None, f"deploy/serve.py exited with {proc.returncode}"
        yield json.loads(state.read_text()), proc
    finally:
        tabs.stop(proc)
    assert proc.returncode == 0
    assert not Path(json.loads(state.read_text())["run_dir"]).exists()  # its temp folder is removed


TABS = 8  # through the balancer, half on each replica


@pytest.mark.timeout(1200)
def test_two_replicas_each_tab_its_own_answer_and_failover(balancer, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    state, serve = balancer
    url, port = state["url"], int(state["url"].rsplit(":", 1)[1])
    replicas = {f"127.0.0.1:{r['port']}": r["pid"] for r in state["replicas"]}
    cookies: dict[str, str] = {}  # replica -> a sticky cookie value nginx hashes to it
    for i in range(200):
        cookies.setdefault(replica_of(url, f"user{i}"), f"user{i}")
        if len(cookies) == 2:
            break
    assert set(cookies) == set(replicas)
    (a, cookie_a), (b, cookie_b) = sorted(cookies.items())
    hosts = {f"http://127.0.0.1:{port}": cookie_a, f"http://localhost:{port}": cookie_b}

    files = tabs.photos(TABS + 1, tmp_path / "photos")  # one per tab, then tab 0's next photo
    expected = [tabs.expected_prediction(p) for p in files]
    assert expected[TABS] != expected[0]
    driver = tabs.chrome(tmp_path / "chrome")
    try:
        for host, cookie in hosts.items():  # each host's cookie jar: its sticky cookie, set before any
            # request (else nginx's answer sets a random one), by CDP: Selenium's add_cookie does not
            # take on an IP-address host (the tab on 127.0.0.1 then landed on either replica)
            driver.execute_cdp_cmd("Network.setCookie", {"name": "visattn_replica", "value": cookie,
                                                         "url": host + "/", "path": "/"})
        urls = list(hosts)  # even tabs on replica a, odd tabs on replica b
        handles = [tabs.open_tab(driver, urls[i % 2], first=i == 0) for i in range(TABS)]
        for i, handle in enumerate(handles):  # what each tab sends: its one sticky cookie
            driver.switch_to.window(handle)
            sent = {c["value"] for c in driver.get_cookies() if c["name"] == "visattn_replica"}
            assert sent == {(cookie_a, cookie_b)[i % 2]}, (i, sent)
        print(f"{time.strftime('%X')} {TABS} tabs open", flush=True)
        tabs.upload_all(driver, handles, files[:TABS])
        results = tabs.collect(driver, handles, files[:TABS], timeout=600)
        for r, e in zip(results, expected):
            assert r.latency is not None and not r.errors, r
            assert r.prediction == e and r.names_shown == [r.file], (r, e)
        assert replica_of(url, cookie_a) == a and replica_of(url, cookie_b) == b  # still sticky

        print(f"{time.strftime('%X')} each tab its answer, latencies {[r.latency for r in results]}", flush=True)
        driver.switch_to.window(handles[0])
        driver.execute_script(tabs.WATCH)  # from now on: counts the tab's new websockets
        tabs.network_log(driver)  # (a failure prints what came after this)
        os.killpg(replicas[a], signal.SIGKILL)  # replica a dies with sessions on it
        tabs.wait_for(lambda: replica_of(url, cookie_a) == b, 30, "nginx to send a's users to b")
        assert serve.poll() is None  # nginx and replica b go on
        # a's user: the page keeps showing what it had; its websocket reconnects through nginx, now to b
        # (a new session there), and the user's next interaction (a new photo) runs on b, with the
        # widgets as the page shows them (upload mode), so the page recovers with the new prediction.
        try:
            tabs.wait_reconnected(driver)
        except TimeoutError:
            print("\n".join(tabs.network_log(driver)[-80:]), flush=True)
            for log in ("access.log", "error.log"):
                print(log, Path(state["run_dir"], log).read_text()[-6000:], sep="\n", flush=True)
            raise
        tabs.upload_all(driver, handles[:1], files[TABS:])
        r, = tabs.collect(driver, handles[:1], files[TABS:], timeout=300)
        assert r.latency is not None and not r.errors and r.prediction == expected[TABS], r
        assert r.names_shown == [files[TABS].name], r
        print(f"{time.strftime('%X')} tab 0 answered by b", flush=True)
        for i in range(1, TABS, 2):  # b's users never noticed
            driver.switch_to.window(handles[i])
            body = driver.find_element(By.TAG_NAME, "body").text
            assert tabs.PREDICTION.search(body).groups() == expected[i] and files[i].name in body, i
    finally:
        driver.quit()
