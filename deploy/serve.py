"""Several dashboard processes behind nginx: ``make serve REPLICAS=N PORT=P``.

Streamlit keeps each browser session in one server process, and one process runs all its
sessions' Python under one GIL; more users want more processes, behind a load balancer
with session affinity. This starts ``N`` replicas of ``dashboard.py`` on 127.0.0.1 (free
ports, one shared ``server.cookieSecret`` so that the XSRF cookie of one replica is
valid on the others), renders ``deploy/nginx.conf.template`` into a temporary folder
(config, pid file, logs, temp files) and runs Debian's nginx in the foreground on
``HOST:PORT``. Ctrl-C (or SIGTERM) stops nginx and every replica and removes the folder.
A replica that dies is not restarted: nginx sends its users to another one (what they
lose is in the README, "Past one machine").

    python deploy/serve.py --replicas 2 --port 8500 [--host 127.0.0.1] [--public] [--state state.json]
"""
from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "nginx.conf.template"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(values: dict[str, str], template: Path = TEMPLATE) -> str:
    """The template with every ``{{NAME}}`` replaced by ``values[NAME]``."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    if "{{" in text:
        raise ValueError(f"unfilled placeholder in {template}: {text[text.index('{{'):][:40]}")
    return text


def replica_command(port: int, public: bool) -> list[str]:
    argv = [sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.headless", "true",
            "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    return argv + (["--", "--public"] if public else [])


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok"
    except OSError:
        return False


def wait_until(predicate, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise SystemExit(f"serve: {what} did not start" + (f" (exit code {dead[0].returncode})" if dead else ""))
        time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--port", type=int, default=8500)
    ap.add_argument("--host", default="127.0.0.1", help="address nginx listens on (0.0.0.0: the network)")
    ap.add_argument("--public", action="store_true", help="the replicas run in public mode (also VISATTN_PUBLIC=1)")
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--state", help="write the replicas' ports and pids here (JSON), for tests and scripts")
    ap.add_argument("--max-upload-mb", type=int, default=260, help="nginx client_max_body_size")
    a = ap.parse_args(argv)
    if a.replicas < 1:
        ap.error("--replicas must be >= 1")
    if not os.access(a.nginx, os.X_OK):
        raise SystemExit(f"serve: nginx not found at {a.nginx} (Debian: apt-get install nginx)")

    run_dir = Path(tempfile.mkdtemp(prefix="visattn-serve-"))
    procs: list[subprocess.Popen] = []

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        secret = secrets.token_hex(32)
        threads = max(1, (os.cpu_count() or 1) // a.replicas)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
               "STREAMLIT_SERVER_COOKIE_SECRET": secret}  # not allowed as a command-line flag
        ports = [free_port() for _ in range(a.replicas)]
        for port in ports:
            procs.append(subprocess.Popen(replica_command(port, a.public), cwd=ROOT, env=env,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        for port in ports:
            wait_until(lambda: healthy(f"http://127.0.0.1:{port}"), 120, f"replica on port {port}", procs)

        user, root = "", os.geteuid() == 0
        if root:  # nginx's workers drop to nobody: let them into the folder and give them the temp folders
            nobody = pwd.getpwnam("nobody")
            user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
            run_dir.chmod(0o755)
        for name in TEMP_DIRS:
            (run_dir / name).mkdir()
            if root:
                os.chown(run_dir / name, nobody.pw_uid, nobody.pw_gid)
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in ports)
        conf = run_dir / "nginx.conf"
        conf.write_text(render({"USER": user, "RUN_DIR": str(run_dir), "MAX_BODY_MB": str(a.max_upload_mb),
                                "SERVERS": servers, "HOST": a.host, "PORT": str(a.port)}))
        nginx_argv = [a.nginx, "-p", str(run_dir), "-e", str(run_dir / "error.log"), "-c", str(conf)]
        check = subprocess.run(nginx_argv + ["-t"], capture_output=True, text=True)
        if check.returncode:
            raise SystemExit("serve: nginx rejects the config: " + check.stderr.strip().splitlines()[-1])
        nginx = subprocess.Popen(nginx_argv, stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(nginx)
        url = f"http://{a.host}:{a.port}"
        wait_until(lambda: healthy(url), 30, "nginx", procs)
        state = {"url": url, "run_dir": str(run_dir), "nginx_pid": nginx.pid,
                 "replicas": [{"port": p, "pid": proc.pid} for p, proc in zip(ports, procs)]}
        if a.state:
            Path(a.state).write_text(json.dumps(state))
        for p, proc in zip(ports, procs):
            print(f"serve: replica http://127.0.0.1:{p} (pid {proc.pid})", flush=True)
        print(f"serve: {a.replicas} replicas behind nginx at {url} (config {conf}); Ctrl-C stops all", flush=True)
        nginx.wait()
        return nginx.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
