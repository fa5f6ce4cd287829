"""Real builds of edgellm at other versions, made from this tree: the wheels an update carries.

A build is this tree's edgellm package with its version set, built into a wheel by pip (no
index, no build isolation: nothing is fetched). `broken=True` makes a version whose service
cannot start (`edgellm serve` exits at once, as a bad release would); `migrates=True` makes it
first rewrite the model catalog in a newer format, as a release with a state change would.
The wheels it needs come from `wheelhouse()`: `make test` collects them (pip wheel), the same
set a board's update bundle carries.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / ".venv" / "wheelhouse"  # made by `make test` (Makefile: $(WHEELHOUSE))

BROKEN = '''def _serve(args: argparse.Namespace) -> int:
    print("edgellm: this build is broken on purpose (tests/builds.py)", file=sys.stderr)
    raise SystemExit(3)


def _unused_serve(args: argparse.Namespace) -> int:'''

MIGRATES = '''def _serve(args: argparse.Namespace) -> int:
    import json as _json
    _config = load(args.config or credential("edgellm.toml") or None)
    _catalog = Path(_config.server.state_dir) / "models" / "catalog.json"
    if _catalog.exists():  # a forward migration to a catalog format older versions cannot read
        _data = _json.loads(_catalog.read_text())
        _data["version"] = 99
        _catalog.write_text(_json.dumps(_data))
    raise SystemExit(3)


def _unused_serve(args: argparse.Namespace) -> int:'''


def wheelhouse() -> Path | None:
    """The dependency wheels (everything but edgellm), or None when `make test` did not make them."""
    return WHEELHOUSE if any(WHEELHOUSE.glob("llama_cpp_python-*.whl")) else None


def edgellm_wheel(version: str, out: Path, *, broken: bool = False, migrates: bool = False) -> Path:
    """This tree as edgellm `version`, built into a wheel in `out`."""
    tree = out / f"tree-{version}"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(REPO / "edgellm", tree / "edgellm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    init = tree / "edgellm" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', f'__version__ = "{version}"  # was "', 1))
    if broken or migrates:
        cli = tree / "edgellm" / "cli.py"
        text = cli.read_text()
        head = "def _serve(args: argparse.Namespace) -> int:"
        assert head in text
        cli.write_text(text.replace(head, MIGRATES if migrates else BROKEN, 1))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(tree)], check=True, capture_output=True)
    shutil.rmtree(tree)
    (wheel,) = out.glob(f"edgellm-{version}-*.whl")
    return wheel


def wheel_dir(version: str, out: Path, **kwargs: bool) -> Path:
    """A directory an update bundle is made from: edgellm `version` and every wheel it needs."""
    house = wheelhouse()
    assert house is not None
    directory = out / f"wheels-{version}"
    directory.mkdir(parents=True)
    for wheel in house.glob("*.whl"):
        if not wheel.name.startswith("edgellm-"):
            shutil.copy(wheel, directory)  # a copy: bundles refuse hard links
    edgellm_wheel(version, directory, **kwargs)
    return directory
