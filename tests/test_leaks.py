"""Every git operation, through both helpers, under every trace knob git has: no token anywhere.

Each case runs clone, fetch, pull, push and ls-remote with a set of tracing knobs turned
on at once (GIT_TRACE, GIT_TRACE_PACKET, GIT_TRACE_CURL, GIT_CURL_VERBOSE, GIT_TRACE2,
GIT_TRACE2_EVENT, GIT_TRACE2_PERF, trace2 targets from system or global config,
GIT_TRACE2_CONFIG_PARAMS / trace2.configParams and GIT_TRACE2_ENV_VARS / trace2.envVars
naming everything that could hold a token), with redaction on and off in several of
git's spellings. Then it scans every output, every file under the test's directory
(traces, clones, HOME, the server's files) and, while git runs, the argv and the
environment (/proc/*/cmdline and /proc/*/environ) of every process it can read.

The credential helper refuses where git would print its token unredacted (that
refusal is the expected outcome there); everywhere else every operation must succeed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from git_credential_codestore import gitenv
from tests.conftest import ORG, DevServer, git, make_key, run_cli, start_dev_server, stop_process
from tests.leakscan import ProcSampler, files_with_secrets, key_needles, secrets_in_text

REPO = "team/leaky"
# Every variable that carries configuration or could carry a header, for trace2's envVars.
ENV_VARS = ",".join(
    ["GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT", *(f"GIT_CONFIG_{kind}_{i}" for kind in ("KEY", "VALUE") for i in range(4)),
     "GIT_ASKPASS", "GIT_TRACE_REDACT", "GIT_DIR", "GIT_EXEC_PATH"]
)
TRACE2_CONFIG = {"configParams": "*", "envVars": ENV_VARS}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """One dev server for the module (its own key), with the repository and one commit."""
    root = tmp_path_factory.mktemp("leaks")
    key = make_key(root)
    srv = start_dev_server(root / "server", key)
    try:
        srv.create_repo(REPO)
        yield srv
    finally:
        stop_process(srv.proc)


@pytest.fixture
def base_env(server: DevServer, hermetic: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("CODESTORE_ORG", ORG)
    monkeypatch.setenv("CODESTORE_PRIVATE_KEY_FILE", str(server.key.path))
    monkeypatch.setenv("CODESTORE_KID", server.key.kid)
    monkeypatch.setenv("CODESTORE_BASE_URL", server.url)
    monkeypatch.setenv("CODESTORE_SCOPES", "git:read git:write")
    monkeypatch.setenv("CODESTORE_AGENT", "off")
    assert run_cli("codestore", "setup").returncode == 0
    return dict(os.environ)


def _knobs(case: str, trace: Path, hermetic: Path) -> dict[str, str]:
    """The tracing environment of one case; config-file targets are written here too."""
    files = {
        "GIT_TRACE": str(trace / "trace"),
        "GIT_TRACE_PACKET": str(trace / "packet"),
        "GIT_TRACE_CURL": str(trace / "curl"),
        "GIT_TRACE2": str(trace / "trace2-normal"),
        "GIT_TRACE2_EVENT": str(trace / "trace2-event"),
        "GIT_TRACE2_PERF": str(trace / "trace2-perf"),
        "GIT_TRACE2_CONFIG_PARAMS": TRACE2_CONFIG["configParams"],
        "GIT_TRACE2_ENV_VARS": TRACE2_CONFIG["envVars"],
    }
    if case == "env, redaction on":
        return files
    if case == "env, GIT_TRACE_REDACT=0":
        return {**files, "GIT_TRACE_REDACT": "0"}
    if case == "env, GIT_TRACE_REDACT=00, GIT_CURL_VERBOSE=0":
        return {**files, "GIT_TRACE_REDACT": "00", "GIT_CURL_VERBOSE": "0", "GIT_TRACE_CURL_NO_DATA": "1"}
    if case == "to stderr, GIT_TRACE_REDACT=false":
        return {"GIT_TRACE": "1", "GIT_TRACE_PACKET": "true", "GIT_TRACE_CURL": "1", "GIT_TRACE2": "1",
                "GIT_TRACE2_PERF": "2", "GIT_TRACE2_EVENT": "true", "GIT_TRACE2_CONFIG_PARAMS": "http.*,*extraheader*,include.*",
                "GIT_TRACE2_ENV_VARS": ENV_VARS, "GIT_TRACE_REDACT": "false"}
    if case in ("system config, redaction on", "global config, GIT_TRACE_REDACT=0x0"):
        system = case.startswith("system")
        target = ["--file", str(trace.parent / "system-gitconfig")] if system else ["--global"]
        for key, value in {
            "trace2.eventTarget": str(trace / "trace2-event"),
            "trace2.normalTarget": str(trace / "trace2-normal"),
            "trace2.perfTarget": str(trace / "trace2-perf"),
            "trace2.eventNesting": "5",
            **{f"trace2.{k}": v for k, v in TRACE2_CONFIG.items()},
        }.items():
            git("config", *target, key, value)
        if system:
            return {"GIT_CONFIG_SYSTEM": str(trace.parent / "system-gitconfig"), "GIT_CONFIG_NOSYSTEM": "0",
                    "GIT_TRACE_CURL": str(trace / "curl")}
        return {"GIT_TRACE_CURL": str(trace / "curl"), "GIT_TRACE_REDACT": "0x0"}
    raise AssertionError(case)


CASES = [
    "env, redaction on",
    "env, GIT_TRACE_REDACT=0",
    "env, GIT_TRACE_REDACT=00, GIT_CURL_VERBOSE=0",
    "to stderr, GIT_TRACE_REDACT=false",
    "system config, redaction on",
    "global config, GIT_TRACE_REDACT=0x0",
]


@pytest.mark.parametrize("helper", ["remote helper", "credential helper"])
@pytest.mark.parametrize("case", CASES)
def test_no_trace_knob_puts_a_token_anywhere(
    server: DevServer, base_env: dict[str, str], hermetic: Path, tmp_path: Path, case: str, helper: str
) -> None:
    # Threat: a token in a trace an agent pastes into a log, in a telemetry pipeline fed by
    # trace2 (def_param events for config values and environment variables), in a file,
    # or in another process's argv or environment.
    trace = tmp_path / "trace"
    trace.mkdir()
    env = {**base_env, **_knobs(case, trace, hermetic)}
    url = f"codestore://{ORG}/{REPO}" if helper == "remote helper" else f"{server.url}/{REPO}.git"
    refuses = helper == "credential helper" and gitenv.would_print_authorization(env)
    work, clone = tmp_path / "work", tmp_path / "clone"
    git("init", "-q", str(work), env=env)
    (work / "f").write_text(case)
    git("add", "f", cwd=work, env=env)
    git("commit", "-qm", case, cwd=work, env=env)
    branch = f"{helper.split()[0]}-{CASES.index(case)}"
    steps: list[tuple[list[str], Path | None]] = [
        (["push", url, f"HEAD:refs/heads/{branch}"], work),
        (["ls-remote", url], None),
        (["clone", "--branch", branch, url, str(clone)], None),
        (["fetch", url, branch], work),
        (["-C", str(clone), "pull", "--no-rebase", url, branch], None),
    ]
    outputs = []
    with ProcSampler() as sampler:
        for args, cwd in steps:
            proc = git(*args, cwd=cwd, env=env, check=False)
            outputs.append(proc.stdout + proc.stderr)
            if refuses:
                assert proc.returncode != 0 and "GIT_TRACE_REDACT" in proc.stderr, proc.stderr
                break
            assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    needles = key_needles(server.key.pem)
    assert secrets_in_text("\n".join(outputs), needles) == []
    assert files_with_secrets(tmp_path, needles) == {}
    assert files_with_secrets(server.data_dir, needles) == {}
    assert sampler.samples > 0 and sampler.environs > 0
    assert sampler.hits == [], sampler.hits[:3]
    if not refuses and "stderr" not in case:
        # The traces were really written, and trace2 really reported config and environment.
        written = {p.name for p in trace.iterdir()}
        # (GIT_CURL_VERBOSE sends the curl trace to stderr instead of the file.)
        expected = {"trace2-event", "trace2-normal", "trace2-perf"} | ({"curl"} - ({"curl"} if "GIT_CURL_VERBOSE" in env else set()))
        assert expected <= written, written
        assert "def_param" in (trace / "trace2-event").read_text()
