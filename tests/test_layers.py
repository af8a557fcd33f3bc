"""The shape of the code: imports run one way, and the proxy's endpoints carry their class."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from endpoints import ENDPOINT_CLASSES, ROUTES
from tests.support import ROOT

# Each layer may import the layers below it, never one above or beside it:
# app → status → limiter, workqueue → proxy → the shared core.
# Some pure modules of a layer's package belong to the core: limiter's limit strings,
# keys file and client identity (settings.py checks GATE_LIMIT_* and GATE_API_KEYS_FILE
# with them in gunicorn's master), and the work queue's scheduler, which decides from
# events alone and on which the fleet's placement builds.
RANKS = {
    "app": 5,
    "graceful": 5,
    "status": 4,
    "limiter": 3,
    "workqueue": 3,
    "proxy": 2,
    "pipeline": 1,
    "endpoints": 1,
    "errors": 1,
    "error_handlers": 1,
    "signals": 1,
    "settings": 1,
    "fleet": 1,
    "fleet.runtime": 4,
    "fleet.shared": 4,
    "fleet.shared_scripts": 3,
    "limiter.policy": 1,
    "limiter.keys": 1,
    "limiter.identity": 1,
    "limiter.allow": 1,
    "workqueue.core": 1,
}
CORE = 1


def rank(module: str) -> int | None:
    """The layer of a first-party module (longest prefix in RANKS), None for others."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        found = RANKS.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``source``, in functions and TYPE_CHECKING too."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            # "from . import lane" and "from pkg import module" name modules too.
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def upward(module: str, target: str) -> bool:
    """Whether ``module`` importing ``target`` breaks the one-way rule."""
    src, dst = rank(module), rank(target)
    if src is None or dst is None:
        return False  # the standard library or a third-party package
    if dst < src:
        return False
    same_package = module.split(".")[0] == target.split(".")[0]
    return not (dst == src and (same_package or src == CORE))


def app_sources() -> Iterator[Path]:
    for name in RANKS:
        if "." in name:
            continue
        path = ROOT / f"{name}.py"
        if path.exists():
            yield path
        else:
            yield from sorted((ROOT / name).rglob("*.py"))


def test_imports_run_one_way() -> None:
    edges = []
    for path in app_sources():
        module = module_name(path)
        source = path.read_text(encoding="utf-8")
        for line, target in imports(source, module, path.name == "__init__.py"):
            if upward(module, target):
                edges.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {target}")
    assert not edges, "imports running up or sideways:\n" + "\n".join(sorted(set(edges)))


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("proxy.views", "from limiter.extension import GateLimiter", True),
        ("proxy.views", "from workqueue import admission", True),
        ("limiter.extension", "import workqueue.gate", True),
        ("limiter.keys", "from .extension import GateLimiter", True),
        ("settings", "import proxy", True),
        ("proxy.lane", "from .relay import Relay", False),
        ("status.views", "from limiter.identity import presented_secret", False),
        ("workqueue.admission", "from pipeline import Call", False),
        ("settings", "from limiter.keys import load_keys", False),
    ],
)
def test_the_import_check_sees_an_upward_import(module: str, source: str, bad: bool) -> None:
    found = [target for _, target in imports(source, module, False) if upward(module, target)]
    assert bool(found) is bad


def test_every_package_of_the_app_has_a_layer() -> None:
    # The app's packages are those mypy checks (pyproject.toml); the simulator is a tool.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    checked = {name.removesuffix(".py") for name in config["tool"]["mypy"]["files"]}
    assert checked - {"fakeollama"} == {name for name in RANKS if "." not in name}


def test_each_proxy_endpoint_has_the_class_of_its_routes() -> None:
    from app import create_app
    from settings import Settings

    app = create_app(Settings())
    classes = {rule: cls for rule, _methods, cls, _model in ROUTES}
    proxied = [rule for rule in app.url_map.iter_rules() if rule.endpoint.startswith("proxy.")]
    assert {rule.endpoint for rule in proxied} == set(ENDPOINT_CLASSES)
    for rule in proxied:
        assert ENDPOINT_CLASSES[rule.endpoint] == classes.get(rule.rule, "light"), rule
