"""The backends' configuration: GATE_UPSTREAM lists and GATE_BACKENDS_FILE tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.config import (
    Backend,
    BackendsError,
    from_upstreams,
    host_port,
    load_backends_file,
    parse_size,
    parse_upstreams,
)
from settings import Settings, SettingsError

DEFAULTS = {"max_models": 3, "model_concurrency": 2}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "backends.toml"
    path.write_text(text)
    return str(path)


def test_one_upstream_is_a_fleet_of_one_named_host_port() -> None:
    (only,) = from_upstreams(parse_upstreams("http://127.0.0.1:11434/"), **DEFAULTS)
    assert only == Backend("127.0.0.1:11434", "http://127.0.0.1:11434", 3, 2)
    assert only.allows("anything:latest")


def test_a_comma_separated_list_names_each_backend() -> None:
    urls = parse_upstreams(" http://gpu-a:11434 , https://gpu-b/ollama,http://[::1]:8080,")
    assert urls == ("http://gpu-a:11434", "https://gpu-b/ollama", "http://[::1]:8080")
    names = [backend.name for backend in from_upstreams(urls, **DEFAULTS)]
    assert names == ["gpu-a:11434", "gpu-b:443", "[::1]:8080"]
    assert host_port("http://gpu-c") == "gpu-c:80"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "comma-separated list"),
        ("http://a:1,ftp://b", "http:// or https://"),
        ("http://a:1,http://a:1/", "listed twice"),
        ("http://a:1?x=1", "query or fragment"),
        ("http://a:70000", "Port out of range"),
    ],
)
def test_bad_upstream_lists_say_what_is_wrong(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_upstreams(value)


def test_two_urls_with_one_host_port_are_refused() -> None:
    with pytest.raises(BackendsError, match="two backends are named 'a:80'"):
        from_upstreams(["http://a", "http://a:80/ollama"], **DEFAULTS)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1024, 1024),
        ("512", 512),
        ("24GiB", 24 * 1024**3),
        ("24 GB", 24 * 10**9),
        ("1.5gib", int(1.5 * 1024**3)),
        ("800MiB", 800 * 1024**2),
        ("2kb", 2000),
        ("1KiB", 1024),
    ],
)
def test_vram_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("24 gigs", "unknown unit 'gigs'"),
        (0, "above 0"),
        ("-1GB", "bytes or a size"),
        (True, "bytes or a size"),
    ],
)
def test_bad_vram_sizes(value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_size(value)


def test_a_backends_file_with_every_field_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [backends.gpu-a]
        url = "http://10.0.0.5:11434/"
        max_models = 2
        vram = "24GiB"
        model_concurrency = 4
        models = ["llama3.2:*", "nomic-embed-text"]
        weight = 2

        [backends.small]
        url = "http://10.0.0.6:11434"
        """,
    )
    big, small = load_backends_file(path, **DEFAULTS)
    assert big == Backend(
        "gpu-a",
        "http://10.0.0.5:11434",
        max_models=2,
        model_concurrency=4,
        vram=24 * 1024**3,
        models=("llama3.2:*", "nomic-embed-text"),
        weight=2.0,
    )
    assert small == Backend("small", "http://10.0.0.6:11434", 3, 2)
    assert big.allows("llama3.2:latest") and big.allows("llama3.2:1b")
    assert big.allows("nomic-embed-text:latest")  # a name without a tag means :latest
    assert not big.allows("llama3.1:latest") and not big.allows("nomic-embed-text:v1.5")
    assert small.allows("llama3.1:latest")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[backends.a\n", "not valid TOML"),
        ("", "no backends"),
        ("[servers.a]\nurl = 'http://a:1'\n", "unknown table 'servers'"),
        ("[backends.a]\nmax_models = 2\n", "backend 'a': field 'url' is required"),
        ("[backends.a]\nurl = 'http://a:1'\nvrma = '1GB'\n", "backend 'a': unknown field 'vrma'"),
        ("[backends.a]\nurl = 'gopher://a'\n", "backend 'a': field 'url': must be an http://"),
        ("[backends.a]\nurl = 'http://a:1'\nmax_models = 0\n", "field 'max_models': must be a"),
        ("[backends.a]\nurl = 'http://a:1'\nmodel_concurrency = 1.5\n", "'model_concurrency'"),
        ("[backends.a]\nurl = 'http://a:1'\nvram = '24 GiBs'\n", "field 'vram': unknown unit"),
        ("[backends.a]\nurl = 'http://a:1'\nmodels = 'llama*'\n", "field 'models': must be a"),
        ("[backends.a]\nurl = 'http://a:1'\nmodels = []\n", "field 'models': must be a"),
        ("[backends.a]\nurl = 'http://a:1'\nweight = 0\n", "field 'weight': must be a number"),
        ("[backends.a]\nurl = 'http://a:1'\n[backends.b]\nurl = 'http://a:1/'\n", "same url"),
        ("[backends.'a b']\nurl = 'http://a:1'\n", "backend 'a b': a name is"),
        ("backends = 3\n", "no backends"),
    ],
)
def test_bad_backends_files_name_the_file_the_backend_and_the_field(
    tmp_path: Path, text: str, says: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(BackendsError) as info:
        load_backends_file(path, **DEFAULTS)
    assert str(info.value).startswith(path + ":")
    assert says in str(info.value)


def test_settings_read_one_upstream_as_today() -> None:
    settings = Settings.from_env({"GATE_UPSTREAM": "http://gpu-box:11434/"})
    assert settings.upstream == "http://gpu-box:11434"
    assert [backend.name for backend in settings.backends()] == ["gpu-box:11434"]


def test_settings_take_defaults_for_backends_from_the_gate_wide_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "[backends.solo]\nurl = 'http://10.0.0.7:11434'\n")
    settings = Settings.from_env(
        {
            "GATE_BACKENDS_FILE": path,
            "GATE_UPSTREAM": "http://ignored:1",
            "GATE_MAX_ACTIVE_MODELS": "2",
            "GATE_MODEL_CONCURRENCY": "3",
        }
    )
    (solo,) = settings.backends()
    assert (solo.name, solo.max_models, solo.model_concurrency) == ("solo", 2, 3)
    # A fleet of one: its backend is the upstream, with its limits.
    assert settings.upstream == "http://10.0.0.7:11434"


def test_a_single_backends_own_limits_become_the_gate_wide_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[backends.solo]\nurl = 'http://10.0.0.7:1'\nmax_models = 4\nmodel_concurrency = 5\n",
    )
    settings = Settings.from_env({"GATE_BACKENDS_FILE": path})
    assert (settings.upstream, settings.max_active_models, settings.model_concurrency) == (
        "http://10.0.0.7:1",
        4,
        5,
    )


def test_settings_name_the_variable_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[backends.a]\nurl = 'http://a:1'\nweight = -1\n")
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"GATE_BACKENDS_FILE": path})
    assert str(info.value).startswith(f"GATE_BACKENDS_FILE: {path}: backend 'a': field 'weight'")


def test_several_backends_take_either_storage() -> None:
    for storage in ("memory://", "redis://127.0.0.1/0"):
        env = {"GATE_UPSTREAM": "http://a:1,http://b:2", "GATE_STORAGE_URI": storage}
        settings = Settings.from_env(env)
        assert [backend.name for backend in settings.backends()] == ["a:1", "b:2"]
