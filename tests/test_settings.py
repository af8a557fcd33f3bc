"""Settings: defaults, parsing, and start-up refusing bad values with the variable's name."""

from __future__ import annotations

import dataclasses
import re
import runpy
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

import settings as settings_module
from fakeollama import FakeOllama
from settings import Settings, SettingsError, unknown_variables
from tests.support import GUNICORN, ROOT, Gate, free_port


def test_defaults_match_the_contract() -> None:
    s = Settings.from_env({})
    assert s.upstream == "http://127.0.0.1:11434"
    assert s.bind == "127.0.0.1:8000"
    assert s.upstream_timeout == 600
    assert s.storage_uri == "memory://"
    assert s.api_keys_file is None
    assert s.trusted_proxies == 0
    assert (s.model_concurrency, s.max_active_models) == (1, 1)
    assert (s.queue_max, s.queue_max_per_client) == (512, 32)
    assert (s.queue_timeout, s.switch_after, s.admin_concurrency) == (300, 10, 1)
    assert s.max_body == 67108864
    assert s.status_access == "public"
    assert s.workers == 1
    assert s.anon_tokens_per_minute == 0


def test_values_are_parsed() -> None:
    s = Settings.from_env(
        {
            "GATE_UPSTREAM": "http://gpu-box:11434/",
            "GATE_UPSTREAM_TIMEOUT": "12.5",
            "GATE_MODEL_CONCURRENCY_OVERRIDES": "nomic-embed-text=4, llama3.2:3b=2",
            "GATE_LIMIT_LIGHT": "OFF",
            "GATE_STATUS_ACCESS": "Local",
            "GATE_SWITCH_AFTER": "0",
            "GATE_QUEUE_LEASE": "2.5",
        }
    )
    assert s.upstream == "http://gpu-box:11434"
    assert s.upstream_timeout == 12.5
    assert s.model_concurrency_overrides == {"nomic-embed-text:latest": 4, "llama3.2:3b": 2}
    assert s.concurrency_for("nomic-embed-text:latest") == 4
    assert s.concurrency_for("other:latest") == 1
    assert s.limit_light == "off"
    assert s.status_access == "local"
    assert s.switch_after == 0
    assert s.queue_lease == 2.5


def test_ollama_rate_limit_is_the_default_for_inference_and_embed() -> None:
    s = Settings.from_env({"OLLAMA_RATE_LIMIT": "10/minute"})
    assert (s.limit_inference, s.limit_embed) == ("10/minute", "10/minute")
    s = Settings.from_env({"OLLAMA_RATE_LIMIT": "10/minute", "GATE_LIMIT_EMBED": "99/minute"})
    assert (s.limit_inference, s.limit_embed) == ("10/minute", "99/minute")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("GATE_UPSTREAM", "ftp://x", "http:// or https://"),
        ("GATE_UPSTREAM", "127.0.0.1:11434", "did you mean 'http://127.0.0.1:11434'?"),
        ("GATE_UPSTREAM", "localhost:11434", "did you mean 'http://localhost:11434'?"),
        ("GATE_UPSTREAM", "http://a:1,127.0.0.1:2", "did you mean 'http://127.0.0.1:2'?"),
        ("GATE_UPSTREAM", "ftp://a:1,http://b:2", "http:// or https://"),
        ("GATE_UPSTREAM", "http://a:1,http://a:1/", "listed twice"),
        ("GATE_BACKENDS_FILE", "/nonexistent/backends.toml", "cannot read"),
        ("GATE_UPSTREAM", "http://host:99999", "Port out of range"),
        ("GATE_BIND", "nonsense", "HOST:PORT"),
        ("GATE_UPSTREAM_TIMEOUT", "0", "above 0"),
        ("GATE_UPSTREAM_TIMEOUT", "soon", "must be a number"),
        ("GATE_QUEUE_MAX", "-3", "1 or more"),
        ("GATE_QUEUE_MAX_PER_CLIENT", "1.5", "must be a number"),
        ("GATE_MODEL_CONCURRENCY_OVERRIDES", "llama3.2", "model=n"),
        ("GATE_MODEL_CONCURRENCY_OVERRIDES", "llama3.2=0", "1 or more"),
        ("GATE_SWITCH_AFTER", "-1", "0 or more"),
        ("GATE_QUEUE_LEASE", "0", "above 0"),
        ("GATE_STATUS_ACCESS", "everyone", "public, admin, local"),
        ("GATE_STORAGE_URI", "mongodb://x", "redis://"),
        ("GATE_TRUSTED_PROXIES", "-1", "0 or more"),
        ("GATE_MAX_BODY", "big", "must be a number"),
        ("GATE_LIMIT_INFERENCE", "60/minit", "unknown period 'minit'"),
        ("GATE_LIMIT_LIGHT", "fast", "cannot read 'fast'"),
        ("OLLAMA_RATE_LIMIT", "0/minute", "1 or more"),
        ("GATE_ANON_TOKENS_PER_MINUTE", "lots", "whole number of tokens"),
        ("GATE_API_KEYS_FILE", "/nonexistent/keys.toml", "cannot read the keys file"),
        ("GATE_WORKER_CONNECTIONS", "lots", "must be a number"),
        ("GATE_GRACEFUL_TIMEOUT", "-5", "0 or more"),
        ("GATE_LOG_LEVEL", "verbose", "debug, info, warning, error, critical"),
        ("GATE_ACCESS_LOG", "maybe", "1 (on) or 0 (off)"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)
    assert says in str(info.value)


def test_several_workers_need_shared_storage() -> None:
    with pytest.raises(SettingsError, match="GATE_WORKERS=3 needs GATE_STORAGE_URI=redis"):
        Settings.from_env({"GATE_WORKERS": "3"})
    s = Settings.from_env({"GATE_WORKERS": "3", "GATE_STORAGE_URI": "redis://127.0.0.1:6379/0"})
    assert s.workers == 3


def run_gunicorn(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """gunicorn as `make run` starts it, expected to refuse ``env`` before serving."""
    return subprocess.run(
        [str(GUNICORN), "-c", "gunicorn.conf.py", "app:create_app()"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "GATE_BIND": f"127.0.0.1:{free_port()}", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("GATE_QUEUE_TIMEOUT", "forever", "must be a number"),
        # The variables gunicorn.conf.py reads for gunicorn itself.
        ("GATE_WORKER_CONNECTIONS", "lots", "must be a number"),
        ("GATE_LOG_LEVEL", "verbose", "must be one of debug, info, warning, error, critical"),
        ("GATE_GRACEFUL_TIMEOUT", "-5", "must be a whole number of 0 or more"),
        ("GATE_WORKERS", "two", "must be a number"),
        ("GATE_BIND", "8000", "must be HOST:PORT or unix:PATH"),
        ("GATE_ACCESS_LOG", "loud", "must be 1 (on) or 0 (off)"),
    ],
)
def test_gunicorn_refuses_to_start_with_a_bad_setting(name: str, value: str, says: str) -> None:
    proc = run_gunicorn({name: value})
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f"ollama-gate: invalid setting: {name}={value!r}: {says}" in output
    assert "Traceback" not in output


def test_gunicorn_config_imports_nothing_gevent_patches() -> None:
    # preload_app stays off and gunicorn.conf.py must not import the app, or gevent
    # patches too late (MonkeyPatchWarning, blocking sockets in urllib3/ssl).
    code = (
        "import runpy, sys; runpy.run_path('gunicorn.conf.py'); "
        "bad = [m for m in ('app', 'flask', 'ssl', 'geventhttpclient', 'urllib3') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_booting_worker_reads_the_entry_points_once() -> None:
    # gevent's patch_all looks its plugins up some 25 times as each worker boots: between
    # post_fork and post_worker_init, one reading of the installed metadata answers them all.
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    real, distributions = metadata.entry_points, metadata.distributions
    groups = ("console_scripts", "gevent.plugins.monkey.will_patch_all", "pytest11")
    wanted = {group: sorted(map(str, real(group=group))) for group in groups}
    reads: list[dict[str, Any]] = []

    def counted(**kwargs: Any) -> Any:
        reads.append(kwargs)
        return distributions(**kwargs)

    conf["post_fork"](None, None)
    try:
        metadata.distributions = counted
        for _ in range(3):
            for group in groups:
                assert sorted(map(str, metadata.entry_points(group=group))) == wanted[group]
        assert reads == []
    finally:
        metadata.distributions = distributions
        conf["restore_entry_points"]()
    assert metadata.entry_points is real


def test_limits_and_token_budget_are_parsed() -> None:
    s = Settings.from_env(
        {"GATE_LIMIT_INFERENCE": " 10 per minute; 2/second ", "GATE_ANON_TOKENS_PER_MINUTE": "5000"}
    )
    assert (s.limit_inference, s.anon_tokens_per_minute) == ("10 per minute; 2/second", 5000)
    assert Settings.from_env({"GATE_ANON_TOKENS_PER_MINUTE": "off"}).anon_tokens_per_minute == 0


def test_a_malformed_keys_file_is_named_with_its_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey_sha256 = "' + "0" * 64 + '"\nrole = "root"\n')
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"GATE_API_KEYS_FILE": str(keys)})
    assert str(info.value).startswith(f"GATE_API_KEYS_FILE={str(keys)!r}: {keys} line 3: ")
    assert 'role must be "user" or "admin"' in str(info.value)


def test_gunicorn_refuses_to_start_with_a_bad_limit_or_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text("[keys.alice]\nkey_sha256 = 42\n")
    for env, says in [
        ({"GATE_LIMIT_EMBED": "lots"}, "GATE_LIMIT_EMBED='lots': cannot read 'lots'"),
        ({"GATE_API_KEYS_FILE": str(keys)}, f"{keys} line 2: [keys.alice]: key_sha256 must be"),
    ]:
        proc = run_gunicorn(env)
        assert proc.returncode != 0
        assert says in proc.stdout + proc.stderr


def test_settings_import_nothing_gevent_patches() -> None:
    # gunicorn's master imports settings in on_starting (and with it limiter.keys and
    # limiter.policy): ssl or socket imported there would reach the workers unpatched.
    code = (
        "import sys, settings; "
        "bad = [m for m in ('ssl', 'socket', 'flask', 'limits', 'redis', 'gevent', 'asyncio') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_readme_settings_table_is_generated_from_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert settings_module.with_table(readme) == readme, (
        "README.md's settings table differs from settings.py: run `make settings-table`"
    )
    table = settings_module.markdown_table()
    for name in settings_module.known_variables():
        assert f"\n| {name} | " in table


def test_every_field_is_declared_once_with_a_variable_and_a_doc() -> None:
    names = [var.env for _, var in settings_module.declarations()]
    assert len(names) == len(set(names)) == len(dataclasses.fields(Settings))
    for _, var in settings_module.declarations():
        assert var.env.startswith("GATE_") and var.doc


def test_unknown_gate_variables_are_named_with_the_closest_known_one() -> None:
    warnings = unknown_variables(
        {"GATE_QUEUE_MAXX": "3", "GATE_UPSTRAEM": "http://x:1", "GATE_QUEUE_MAX": "3", "HOME": "/"}
    )
    assert warnings == [
        "GATE_QUEUE_MAXX is not a setting of the gate and is ignored "
        "(did you mean GATE_QUEUE_MAX?)",
        "GATE_UPSTRAEM is not a setting of the gate and is ignored (did you mean GATE_UPSTREAM?)",
    ]
    assert unknown_variables({"GATE_ZZZ": "1"}) == [
        "GATE_ZZZ is not a setting of the gate and is ignored"
    ]


def test_the_description_names_the_configuration_and_hides_passwords(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text("".join(f'[keys.k{i}]\nkey_sha256 = "{str(i) * 64}"\n' for i in range(1, 4)))
    line = Settings(
        upstream="http://gpu:11434",
        api_keys_file=str(keys),
        limit_light="off",
        storage_uri="redis://:hunter2@cache:6379/0",
        workers=2,
        queue_max=100,
        queue_max_per_client=7,
        queue_timeout=30.0,
        model_concurrency_overrides={"nomic-embed-text:latest": 4},
        status_access="local",
    ).describe()
    assert "upstream http://gpu:11434" in line
    assert f"3 API keys from {keys}" in line
    assert "inference 120/minute" in line and "light off" in line
    assert "100 waiting at most, 7 per client, 30 s timeout" in line
    assert "nomic-embed-text:latest 4" in line
    assert "storage redis://:***@cache:6379/0" in line and "hunter2" not in line
    assert "status access local" in line
    assert "open access" in Settings().describe()


def test_importing_the_app_builds_nothing() -> None:
    # The factory is served as app:create_app(): importing app reads no environment,
    # so a broken variable in the shell cannot break a test that builds its own app.
    code = "import app; assert not hasattr(app, 'app'); print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "GATE_QUEUE_TIMEOUT": "forever"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stdout + proc.stderr


def test_gunicorn_logs_the_configuration_and_unknown_variables_at_start_up(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(
        fake.url, {"GATE_QUEUE_MAX": "77", "GATE_QUEUE_MAXX": "3", "GATE_LIMIT_ADMIN": "9/minute"}
    )
    logs = gate.logs()
    [line] = [entry for entry in logs.splitlines() if "ollama-gate: upstream" in entry]
    assert "[INFO]" in line
    assert f"upstream {fake.url};" in line
    assert "no API keys" in line
    assert "admin 9/minute" in line and "light off" in line
    assert "77 waiting at most, 32 per client" in line
    assert "storage memory://" in line and "status access public" in line
    assert (
        "[WARNING] gunicorn.error: ollama-gate: GATE_QUEUE_MAXX is not a setting of the gate "
        "and is ignored (did you mean GATE_QUEUE_MAX?)"
    ) in logs


def test_the_docs_name_only_variables_the_gate_reads() -> None:
    # A renamed or removed setting must not live on in the docs or the deployment files.
    known = set(settings_module.known_variables())
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted(path for path in (ROOT / "deploy").iterdir() if path.is_file())
    stale = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in re.findall(r"\bGATE_[A-Z_]*[A-Z]\b", path.read_text(encoding="utf-8"))
        if name not in known and not name.startswith("GATE_TEST_")
    }
    assert not stale, sorted(stale)
