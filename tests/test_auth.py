"""API tokens, for real: one `bentoml serve` with SVERTKA_API_TOKEN_FILE (two tokens), every endpoint
without / with a wrong / with an empty / with the right token, rotation by editing the file, the log
free of tokens; start-up refusals (bad token file, a bundle that names outside weights) and the warning
of an open server.

    pytest tests/test_auth.py          # a server with a token, one without (~20 s each to start), one refusal
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import httpx
import pytest
from test_batch import make_bundles
from test_serving import REPO, START_TIMEOUT, bentoml_home, free_port, sample_images, serve_env, stop

from serving import auth

TOKEN_A = "tok-A-7f3c9e1b2d4a6f80a1b2c3d4e5f60718"
TOKEN_B = "tok-B-0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b"
WRONG = "tok-W-this-one-is-not-in-the-file-000"


# ---------------------------------------------------------------------------------------------
# A store, a token file, one server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two bundles (written by models.bundle, no training) in a temporary BentoML store, plus a bad one."""
    from models.store import bundle_dir_for_tag, save_bundle_to_bentoml

    root = tmp_path_factory.mktemp("auth")
    bundles = make_bundles(root / "bundles")
    home = root / "bentoml"
    with bentoml_home(home):
        save_bundle_to_bentoml(bundles["clf"], "auth_clf")
        save_bundle_to_bentoml(bundles["age"], "auth_age")
        save_bundle_to_bentoml(bundles["clf"], "auth_bad")  # then edited in the store, as an attacker would
        meta_file = bundle_dir_for_tag("auth_bad:latest") / "bundle.json"
    meta = json.loads(meta_file.read_text())
    meta["architecture"]["kwargs"]["weights"] = "/etc/passwd"
    meta_file.write_text(json.dumps(meta))
    return {"home": home, "root": root}


@contextmanager
def running(cmd: list[str], env: dict[str, str], log_path: Path) -> Iterator[tuple[str, Path]]:
    """`bentoml serve ... --port P` started, ready (/readyz) before yielding its URL; stopped after."""
    port = free_port()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"bentoml serve not ready after {START_TIMEOUT} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url, log_path
        finally:
            stop(proc)


@pytest.fixture(scope="module")
def server(store: dict) -> Iterator[dict]:
    token_file = store["root"] / "tokens.txt"
    token_file.write_text(f"# Svertka API tokens, one a line\n{TOKEN_A}\n\n{TOKEN_B}\n")
    env = serve_env(
        store["home"],
        "auth_clf,auth_age",
        SVERTKA_API_TOKEN_FILE=str(token_file),
        BENTOML_CONFIG_OPTIONS="services.svertka.logging.access.enabled=true",
    )
    cmd = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1"]
    with running(cmd, env, store["root"] / "serve.log") as (url, log):
        yield {"url": url, "log": log, "token_file": token_file}


def call(url: str, endpoint: str, headers: dict[str, str]) -> httpx.Response:
    image = sample_images()["rgb.png"]
    method, path = endpoint.split(" ")
    files = {"image": ("a.png", image)} if path in ("/classify", "/estimate_age") else None
    return httpx.request(method, f"{url}{path}", files=files, headers=headers, timeout=30)


ENDPOINTS = ["POST /classify", "POST /estimate_age", "GET /models", "POST /models"]
REFUSED = {  # Authorization header -> words of the 401's reason
    "none": (None, "missing api token"),
    "wrong": (f"Bearer {WRONG}", "invalid api token"),
    "empty Bearer": ("Bearer", "empty api token"),  # "Bearer " as curl sends it: h11 strips the space
    "Basic": (f"Basic {TOKEN_A}", "must be 'bearer <token>'"),
}


# ---------------------------------------------------------------------------------------------
# Every endpoint: 401, 401, 401, 200
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_endpoint_needs_the_token(server: dict, endpoint: str) -> None:
    for case, (header, words) in REFUSED.items():
        r = call(server["url"], endpoint, {"Authorization": header} if header is not None else {})
        assert r.status_code == 401, (case, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer"), case
        assert r.json() == {"error": r.json()["error"]} and words in r.json()["error"].lower(), (case, r.text)
        assert TOKEN_A not in r.text and WRONG not in r.text
    r = call(server["url"], endpoint, {"Authorization": f"Bearer {TOKEN_A}"})
    assert r.status_code == 200, r.text
    body = r.json()
    if endpoint.endswith("/models"):
        assert [m["configured_as"] for m in body["models"]] == ["auth_clf:latest", "auth_age:latest"]
    else:
        assert "model" in body and "error" not in body


def test_root_needs_the_token_and_browsers_get_a_prompt(server: dict) -> None:
    url = server["url"]
    for case, (header, _) in REFUSED.items():
        r = httpx.get(url + "/", headers={"Authorization": header} if header is not None else {})
        assert r.status_code == 401 and "error" in r.json(), case
        assert r.headers["www-authenticate"].startswith("Bearer")
    page = httpx.get(url + "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Bearer")
    assert page.headers["content-type"].startswith("text/html")
    assert "sessionStorage.setItem(KEY" in page.text and '"svertka_token"' in page.text
    assert "document.open()" in page.text and "Authorization" in page.text and TOKEN_A not in page.text
    # with the token: whatever the service serves at / (BentoML's UI, or the Svertka page once it exists)
    r = httpx.get(url + "/", headers={"Authorization": f"Bearer {TOKEN_A}", "Accept": "text/html"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


def test_health_endpoints_stay_open(server: dict) -> None:
    for path in ("/readyz", "/livez", "/healthz"):
        r = httpx.get(server["url"] + path)
        assert r.status_code == 200, (path, r.text)
    assert httpx.get(server["url"] + "/metrics").status_code != 401
    assert httpx.get(server["url"] + "/docs.json").status_code == 401  # everything else is closed


def test_bentoml_client_with_a_token(server: dict) -> None:
    import bentoml

    with bentoml.SyncHTTPClient(server["url"], token=TOKEN_B) as client:  # sends Authorization: Bearer
        tags = [m["configured_as"] for m in client.models()["models"]]
    assert tags == ["auth_clf:latest", "auth_age:latest"]
    with pytest.raises(bentoml.exceptions.BentoMLException):
        bentoml.SyncHTTPClient(server["url"], token=WRONG)  # its schema fetch gets the 401


def test_token_file_rotation_needs_no_restart(server: dict) -> None:
    url, token_file = server["url"], server["token_file"]

    def status(token: str) -> int:
        return httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {token}"}).status_code

    assert (status(TOKEN_A), status(TOKEN_B)) == (200, 200)
    token_file.write_text(f"{TOKEN_B}\n")  # TOKEN_A revoked
    assert (status(TOKEN_A), status(TOKEN_B), status(WRONG)) == (401, 200, 401)
    tmp = token_file.with_name("tokens.new")
    tmp.write_text(f"{TOKEN_A}\n")  # an atomic replace, as secret managers do: back to TOKEN_A only
    os.replace(tmp, token_file)
    assert (status(TOKEN_A), status(TOKEN_B)) == (200, 401)
    token_file.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")


def test_tokens_never_reach_the_log(server: dict) -> None:
    """Runs last (file order): after every call above, with the access log on."""
    assert httpx.get(f"{server['url']}/models", headers={"Authorization": f"Bearer {WRONG}"}).status_code == 401
    time.sleep(1)  # let the access log lines reach the file
    log = server["log"].read_text()
    assert "/models" in log  # the access log did record the requests
    for token in (TOKEN_A, TOKEN_B, WRONG):
        assert token not in log
    assert "warning: no API token" not in log


# ---------------------------------------------------------------------------------------------
# Start-up: refusals and the open-server warning
# ---------------------------------------------------------------------------------------------


def _start_fails(store: dict, models: str, **extra: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO,
        env=serve_env(store["home"], models, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    # one line: `error: ...` (serving/auth.py) or BentoML's `Error: [serve] ...` for a SettingsError
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.lower().startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.mark.slow  # ~10 s; by default test_serving's tampered-graph start and test_bundle's outside-argument refusals
def test_bundle_with_outside_weights_stops_the_server(store: dict) -> None:
    line = _start_fails(store, "auth_clf,auth_bad")
    assert "'auth_bad:latest'" in line and "architecture argument 'weights' is refused" in line, line


@pytest.mark.slow  # ~12 s; test_startup_exits_with_one_line_on_a_bad_file checks the same in process
def test_missing_token_file_stops_the_server(store: dict) -> None:
    missing = store["root"] / "no_such_tokens.txt"
    line = _start_fails(store, "auth_clf", SVERTKA_API_TOKEN_FILE=str(missing))
    assert line == f"error: SVERTKA_API_TOKEN_FILE={missing}: No such file or directory", line


def test_open_server_warns_once(store: dict) -> None:
    """No token and BENTOML_HOST=0.0.0.0 (what `bentoml serve` binds by default): one warning, two workers."""
    env = {**serve_env(store["home"], "auth_clf", BENTOML_HOST="0.0.0.0"), "SVERTKA_WORKERS": "2"}
    with running([sys.executable, "-m", "bentoml", "serve"], env, store["root"] / "open.log") as (url, log):
        assert httpx.get(f"{url}/models").status_code == 200  # no token: the README's local flow works
    warnings = [line for line in log.read_text().splitlines() if "warning: no API token" in line]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "SVERTKA_API_TOKEN" in warnings[0], warnings


# ---------------------------------------------------------------------------------------------
# In process: tokens, the file, the host decision
# ---------------------------------------------------------------------------------------------


def test_token_file_parsing_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\n\n  abc  \n#def\nxyz\n")
    tokens = auth.Tokens(file=f)
    assert tokens.current() == [b"abc", b"xyz"]
    assert tokens.accepts(b"abc") and tokens.accepts(b"xyz") and not tokens.accepts(b"def")
    assert not tokens.accepts(b"") and not tokens.accepts(b"ab")
    for text, words in (("# only comments\n\n", "holds no token"), ("two words\n", "line 1 holds more than one")):
        f.write_text(text)
        with pytest.raises(auth.TokenError, match=words) as e:
            auth.Tokens(file=f)
        assert "two words" not in str(e.value)  # no token text in messages
    with pytest.raises(auth.TokenError, match="No such file"):
        auth.Tokens(file=tmp_path / "nope")
    assert auth.Tokens.from_env({}) is None
    assert auth.Tokens.from_env({"SVERTKA_API_TOKEN": "s3cret"}).current() == [b"s3cret"]
    with pytest.raises(auth.TokenError, match="SVERTKA_API_TOKEN is blank"):
        auth.Tokens.from_env({"SVERTKA_API_TOKEN": "   "})


def test_token_file_vanishing_fails_closed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "tokens"
    f.write_text("abc\n")
    tokens = auth.Tokens("envtoken", f)
    assert tokens.accepts(b"abc") and tokens.accepts(b"envtoken")
    f.unlink()
    assert not tokens.accepts(b"abc") and tokens.accepts(b"envtoken")
    assert not tokens.accepts(b"abc")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "abc" not in err  # warned once, token not shown
    f.write_text("abc\n")
    assert tokens.accepts(b"abc")


def test_startup_exits_with_one_line_on_a_bad_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        auth.startup({"SVERTKA_API_TOKEN_FILE": str(tmp_path / "nope")})
    assert str(e.value).startswith("error: SVERTKA_API_TOKEN_FILE=") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "host, open_",
    [
        ("0.0.0.0", True),
        ("::", True),
        ("192.168.1.20", True),
        ("example.org", True),
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("::1", False),
        ("localhost", False),
    ],  # fmt: skip
)
def test_warning_decision(host: str, open_: bool) -> None:
    assert auth.should_warn(None, host) is open_
    assert auth.should_warn(auth.Tokens("s3cret"), host) is False  # a token: never
    assert auth.should_warn(None, None) is False  # not `bentoml serve` (a worker, a test, bentoml build)


@pytest.mark.parametrize(
    "args, env, expected",
    [([], {}, "0.0.0.0"), (["--host", "127.0.0.1"], {}, "127.0.0.1"), ([], {"BENTOML_HOST": "10.1.2.3"}, "10.1.2.3")],
)
def test_serve_host_reads_the_serve_command(
    args: list[str], env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve_host() inside a click command shaped like `bentoml serve` (--host, envvar BENTOML_HOST)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = []

    @click.command()
    @click.option("--host", envvar="BENTOML_HOST")
    def serve(host: str | None) -> None:
        seen.append(auth.serve_host())

    serve.main(args, standalone_mode=False)
    assert seen == [expected]
    assert auth.serve_host() is None  # outside the command
