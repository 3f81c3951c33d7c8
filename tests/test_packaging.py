"""The built wheel, as a user gets it: one import package, installable per role, self-contained.

One module fixture copies the source tree to a temporary directory (so the build never
writes into the repository and no stale `build/` of an earlier build leaks into the
wheel), builds the sdist and the wheel from it with `python -m build` (the wheel from
the sdist, as pip does with a release), and installs `WHEEL[agent]` into a fresh
virtualenv. Every command then runs from that virtualenv, in a directory outside the
repository, with no PYTHONPATH: what works there works for a user.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
# top-level folders, symlinked into quotaflow/
EDGES = ("producers", "streams", "sinks", "dashboards")
# Not part of a checkout: caches, virtualenvs, earlier builds (build/ and dist/ at the top;
# dashboards/build/ is source: the built dashboards are committed).
_NOT_ANYWHERE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "*.egg-info", "__pycache__", "*.pyc",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", ".quotaflow-state",
)


def _NOT_SOURCE(folder: str, names: list[str]) -> set[str]:
    ignored = set(_NOT_ANYWHERE(folder, names))
    if Path(folder).resolve() == REPO:
        ignored |= {"build", "dist"} & set(names)
    return ignored
# `wg show all dump`: an interface line (5 fields), then one line per peer (9 fields).
WG_DUMP = (
    "wg0\tSCdstIWhQ2Fn7Wb6nFiuEjFy6qMbnwl6tT2+vBdYqG4=\thvChzAEfNA8rpmYMtuQUr7b8Rsax46tdosgkQNvy9s0="
    "\t51820\toff\n"
    "wg0\t9xBb9s+DPUUSgbmrZenA2HpgxVUx05YxHZodhr9XpFE=\t(none)\t198.51.100.7:40123"
    "\t10.66.0.2/32\t1795262390\t48213390\t912837412\t25\n"
    "wg0\tWJ4yiws4GDt3k0Y0BCRBqbAd72nokJFHXC6lNsESjHc=\t(none)\t203.0.113.24:51820"
    "\t10.66.0.3/32,fd00:66::3/128\t1795262101\t1203\t8812\toff\n"
)
WG_READINGS = [  # received from the peer is the user's upload
    {"user_id": "9xBb9s+DPUUSgbmrZenA2HpgxVUx05YxHZodhr9XpFE=", "up": 48213390, "down": 912837412},
    {"user_id": "WJ4yiws4GDt3k0Y0BCRBqbAd72nokJFHXC6lNsESjHc=", "up": 1203, "down": 8812},
]


@dataclass
class Installed:
    """The built distributions and a virtualenv with `WHEEL[agent]` installed."""

    source: Path  # the copy of the repository the wheel was built from
    wheel: Path
    sdist: Path
    venv: Path
    cwd: Path  # a directory outside the repository to run commands in
    env: dict[str, str]

    def run(
        self, *args: str, extra_env: Mapping[str, str] | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a program of the virtualenv (`quotaflow`, `python`) with its output captured."""
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            cwd=self.cwd, env={**self.env, **(extra_env or {})},
            capture_output=True, text=True, timeout=timeout, check=False,
        )


def _clean_env(venv: Path) -> dict[str, str]:
    """This environment without anything that points Python at the repository or its venv."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH"}
    env = {
        k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("QUOTAFLOW_")
    }
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not _in_repo(Path(p))]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["VIRTUAL_ENV"] = str(venv)
    env["COLUMNS"] = "200"  # rich wraps at 80 columns when not on a terminal
    return env


def _in_repo(path: Path) -> bool:
    try:
        return path.resolve().is_relative_to(REPO)
    except OSError:
        return False


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode})\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def _build(source: Path, outdir: Path) -> None:
    """`python -m build` (sdist, then the wheel from it); `pip` without the `build` package."""
    try:
        import build  # noqa: F401
    except ImportError:
        commands = [
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(outdir), str(source)],
            [sys.executable, "-c", "import setuptools.build_meta as b, sys; "
             "b.build_sdist(sys.argv[1])", str(outdir)],
        ]
    else:
        commands = [[sys.executable, "-m", "build", "--outdir", str(outdir), str(source)]]
    for command in commands:
        result = subprocess.run(
            command, cwd=source, capture_output=True, text=True, timeout=600, check=False
        )
        _check(result, " ".join(command))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from a copy of the repository and install it with [agent], once."""
    root = tmp_path_factory.mktemp("packaging")
    source, dist, venv, cwd = root / "source", root / "dist", root / "venv", root / "cwd"
    shutil.copytree(REPO, source, symlinks=True, ignore=_NOT_SOURCE)
    cwd.mkdir()
    _build(source, dist)
    wheels, sdists = sorted(dist.glob("quotaflow-*.whl")), sorted(dist.glob("quotaflow-*.tar.gz"))
    assert len(wheels) == 1, f"expected one wheel in {dist}: {os.listdir(dist)}"

    env = _clean_env(venv)
    python = shutil.which("python3.11", path=env["PATH"]) or sys.executable
    result = subprocess.run(
        [python, "-m", "venv", str(venv)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    _check(result, "python3.11 -m venv")
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheels[0]}[agent]"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    _check(result, "pip install WHEEL[agent]")
    return Installed(source, wheels[0], sdists[0] if sdists else Path(), venv, cwd, env)


# -- 1. the wheel ---------------------------------------------------------------------------


def test_wheel_has_exactly_one_top_level_package(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        dist_infos = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert len(dist_infos) == 1, dist_infos
        (dist_info,) = dist_infos
        outside = [n for n in names if not n.startswith(("quotaflow/", f"{dist_info}/"))]
        assert outside == [], f"files outside quotaflow/ in the wheel: {outside}"
        assert [n for n in names if n.endswith(".py") and not n.startswith("quotaflow/")] == []
        if f"{dist_info}/top_level.txt" in names:
            top_level = wheel.read(f"{dist_info}/top_level.txt").decode().split()
            assert top_level == ["quotaflow"]
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        assert "quotaflow = quotaflow.cli:main" in entry_points
        record = {line.split(",")[0] for line in wheel.read(f"{dist_info}/RECORD").decode().split()}
        assert record == set(names)


def test_wheel_ships_the_templates(installed: Installed) -> None:
    templates = installed.source / "quotaflow" / "dev" / "templates"
    expected = {f"quotaflow/dev/templates/{p.name}" for p in templates.iterdir() if p.is_file()}
    assert {
        "quotaflow/dev/templates/pom.xml",
        "quotaflow/dev/templates/server.properties",
        "quotaflow/dev/templates/influxdb.conf",
        "quotaflow/dev/templates/log4j2.properties",
    } <= expected
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        assert expected <= names, f"templates missing from the wheel: {expected - names}"
        assert "quotaflow/py.typed" in names
        for name in expected:
            assert wheel.read(name) == (installed.source / name).read_bytes(), name
    if installed.sdist != Path():  # the sdist the wheel was built from has them too
        with tarfile.open(installed.sdist) as sdist:
            members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
        assert expected <= members, f"templates missing from the sdist: {expected - members}"


def test_wheel_ships_the_built_dashboards(installed: Installed) -> None:
    """Operators import dashboards/build/*.json without Python; the wheel has them too."""
    built = {f"quotaflow/dashboards/build/{p.name}": p
             for p in (installed.source / "dashboards" / "build").glob("*.json")}
    assert len(built) == 5
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        assert set(built) <= names, f"missing from the wheel: {set(built) - names}"
        for name, path in built.items():
            assert wheel.read(name) == path.read_bytes(), name


@pytest.mark.parametrize("edge", EDGES)
def test_wheel_holds_the_edges_as_real_files(installed: Installed, edge: str) -> None:
    link = installed.source / "quotaflow" / edge
    assert link.is_symlink(), f"quotaflow/{edge} should be the symlink to ../{edge}"
    folder = installed.source / edge
    expected = {
        f"quotaflow/{edge}/{p.relative_to(folder).as_posix()}": p
        for p in folder.rglob("*.py")
        if "__pycache__" not in p.parts and "proto" not in p.parts  # the generator is not shipped
    }
    assert f"quotaflow/{edge}/__init__.py" in expected
    with zipfile.ZipFile(installed.wheel) as wheel:
        infos = {info.filename: info for info in wheel.infolist()}
        assert f"quotaflow/{edge}" not in infos, "the symlink itself was packed as a file"
        missing = set(expected) - set(infos)
        assert not missing, f"missing from the wheel: {sorted(missing)}"
        for name, path in expected.items():
            mode = infos[name].external_attr >> 16
            assert not stat.S_ISLNK(mode), f"{name} is a symlink in the wheel"
            assert mode == 0 or stat.S_ISREG(mode), f"{name}: mode {oct(mode)}"
            assert wheel.read(name) == path.read_bytes(), f"{name} differs from {path}"


# -- 2. a node's install: WHEEL[agent] --------------------------------------------------------


def test_installed_package_comes_from_the_virtualenv(installed: Installed) -> None:
    result = installed.run(
        "python", "-c",
        "import json, sys, quotaflow, quotaflow.producers as p; "
        "print(json.dumps({'file': quotaflow.__file__, 'producers': p.__file__, "
        "'path': sys.path}))",
    )
    _check(result, "import quotaflow")
    found = json.loads(result.stdout)
    site = installed.venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    for key in ("file", "producers"):
        assert Path(found[key]).is_relative_to(site / "site-packages"), found[key]
    assert not [p for p in found["path"] if p and _in_repo(Path(p))], found["path"]
    installed_edges = Path(found["producers"]).parent
    assert installed_edges.is_dir() and not installed_edges.is_symlink()


def test_help(installed: Installed) -> None:
    result = installed.run("quotaflow", "--help")
    _check(result, "quotaflow --help")
    for command in ("parse", "agent", "worker", "usage", "local"):
        assert command in result.stdout


def test_parse_wireguard_dump(installed: Installed) -> None:
    dump = installed.cwd / "wg-show-all-dump.txt"
    dump.write_text(WG_DUMP)
    result = installed.run("quotaflow", "parse", "--source", "wireguard", str(dump))
    _check(result, "quotaflow parse --source wireguard")
    readings = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert sorted(readings, key=lambda r: r["user_id"]) == WG_READINGS


@pytest.mark.parametrize("module", ["faust", "aiokafka", "influxdb_client"])
def test_agent_extra_does_not_pull_in_the_pipeline(installed: Installed, module: str) -> None:
    result = installed.run("python", "-c", f"import {module}")
    assert result.returncode != 0, f"`import {module}` worked: [agent] pulled in the pipeline"
    assert "ModuleNotFoundError" in result.stderr, result.stderr


def test_agent_modules_import(installed: Installed) -> None:
    statement = "import quotaflow.producers.agent, quotaflow.producers.push"
    result = installed.run("python", "-c", statement)
    _check(result, statement)


@pytest.mark.parametrize(
    "command", [["worker"], ["sink", "influx"], ["run", "--seconds", "1"], ["usage", "--user", "u"]]
)
def test_pipeline_commands_name_their_extra(installed: Installed, command: list[str]) -> None:
    result = installed.run("quotaflow", *command)
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "quotaflow[pipeline]" in message, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "command", [["dashboards", "build", "--out", "x"], ["dashboards", "push", "--url", "u",
                "--token", "t"], ["report", "--out", "x"]]
)
def test_dashboard_commands_name_their_extra(installed: Installed, command: list[str]) -> None:
    result = installed.run("quotaflow", *command)
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "quotaflow[dashboards]" in message, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


# -- 3. `quotaflow local` from the installed wheel ---------------------------------------------


def _influx_ping(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _accepts(bootstrap: str) -> bool:
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return True
    except OSError:
        return False


@pytest.fixture
def local_env(installed: Installed, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The developer's install cache (nothing is rebuilt) and a state dir of this test's own."""
    cache = os.environ.get("QUOTAFLOW_CACHE_DIR") or str(Path.home() / ".cache" / "quotaflow")
    env = {"QUOTAFLOW_CACHE_DIR": cache, "QUOTAFLOW_LOCAL_DIR": str(tmp_path / "local")}
    yield env
    installed.run("quotaflow", "local", "down", extra_env=env, timeout=180)  # even on failure


def test_local_up_status_down(installed: Installed, local_env: dict[str, str]) -> None:
    up = installed.run("quotaflow", "local", "up", "--env", extra_env=local_env, timeout=1800)
    _check(up, "quotaflow local up --env")
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in up.stdout.splitlines()
        if line.startswith("export ")
    )
    bootstrap, influx = exports["QUOTAFLOW_KAFKA_BOOTSTRAP"], exports["QUOTAFLOW_INFLUX_URL"]
    assert _influx_ping(influx) == 204
    assert _accepts(bootstrap)

    status = installed.run("quotaflow", "local", "status", extra_env=local_env)
    _check(status, "quotaflow local status")
    state = json.loads(status.stdout)
    assert state["running"] is True, state
    assert state["kafka"]["bootstrap"] == bootstrap and state["kafka"]["answers"] is True
    assert state["influx"]["url"] == influx and state["influx"]["answers"] is True
    assert Path(state["run_dir"]).is_relative_to(local_env["QUOTAFLOW_LOCAL_DIR"])

    down = installed.run("quotaflow", "local", "down", extra_env=local_env, timeout=180)
    _check(down, "quotaflow local down")
    assert _influx_ping(influx) is None
    assert not _accepts(bootstrap)
    after = installed.run("quotaflow", "local", "status", extra_env=local_env)
    _check(after, "quotaflow local status (after down)")
    assert json.loads(after.stdout)["running"] is False
