"""The dependency lock: constraints.txt holds the exact version of every package the repo installs (torch aside),
the set the test suite ran with. Three commands own it:

    python -m tools.deps lock            # rewrite constraints.txt from the newest releases requirements.txt admits
    python -m tools.deps check-latest    # the suite in a throwaway venv with the newest releases; what moved
    python -m tools.deps wheels DIR      # the locked wheels, for a GPU machine without internet

`lock` and `check-latest` build a fresh venv in a temporary folder: torch==2.13.0 (the CPU build; torch is the one
package left to the user, who installs the CUDA build that fits their driver), then `pip install -r
requirements.txt` with nothing pinned, so pip resolves the newest releases within requirements.txt's ranges.
`lock` writes that venv's `pip freeze` as the lock; `check-latest` compares it with the lock and runs README's test
command there, to learn before users do whether next month's releases still work. Why pip and not uv or pip-tools:
pip is the only installer here that takes torch from the machine's own wheel instead of downloading it.

The GPU-only packages (requirements-gpu.txt: flash-attn, liger-kernel) cannot be installed on a CPU machine; their
newest releases are pinned in the lock's last section, and marked as not tested by the suite.
"""

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from utils.compat import CONSTRAINTS, locked_versions, normalise
from utils.errors import ConfigError, run_main

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
GPU_REQUIREMENTS = REPO / "requirements-gpu.txt"
TEST_COMMAND = ["-m", "pytest", "-q", "-n", "2", "--dist", "loadfile"]
# Left out of the wheels: the GPU machine's own torch brings these, built for its CUDA.
TORCH_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", shlex.join(command), flush=True)
    return subprocess.run(command, check=True, text=True, **kwargs)


def newest_venv(folder: Path) -> Path:
    """A venv with torch and the newest releases of requirements.txt; returns its python."""
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", TORCH])
    run([str(python), "-m", "pip", "install", "--quiet", "-r", str(REPO / "requirements.txt")])
    return python


def frozen(python: Path) -> dict[str, str]:
    lines = run([str(python), "-m", "pip", "freeze", "--exclude", "torch"], capture_output=True).stdout
    pins = {}
    for line in lines.splitlines():
        name, sep, version = line.partition("==")
        if not sep:
            raise ConfigError(f"pip freeze gave {line!r}, not name==version: is a package installed from a path?")
        pins[name] = version
    return pins


def gpu_pins() -> list[str]:
    """The newest release of each GPU-only requirement (pip index: no download, no build)."""
    pins = []
    for line in GPU_REQUIREMENTS.read_text().splitlines():
        name = re.split(r"[<>=!~;\[\s#]", line.strip(), maxsplit=1)[0]
        if not name:
            continue
        listing = run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True).stdout
        newest = re.search(r"\(([^)]+)\)", listing)[1]  # "flash-attn (2.8.3)" on the first line
        pins.append(f"{name}=={newest}")
    return pins


def lock(args) -> None:
    with tempfile.TemporaryDirectory(prefix="mini-qwen-lock-") as folder:
        pins = frozen(newest_venv(Path(folder)))
    lines = ["# The tested set: every package the repo installs, exact (torch aside: install the build that fits your",
             "# machine first). Written by `python -m tools.deps lock`; install with",
             "#   pip install torch==2.13.0 && pip install -r requirements.txt -c constraints.txt",
             *(f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda item: normalise(item[0]))),
             "# GPU-only (requirements-gpu.txt): the newest releases when locked, not run by the CPU test suite",
             *gpu_pins()]
    CONSTRAINTS.write_text("\n".join(lines) + "\n")
    print(f"{CONSTRAINTS}: {len(pins)} packages locked")


def check_latest(args) -> None:
    with tempfile.TemporaryDirectory(prefix="mini-qwen-latest-") as folder:
        python = newest_venv(Path(folder))
        locked, newest = locked_versions(), frozen(python)
        moved = [f"{name} {locked.get(normalise(name), 'new')} -> {version}" for name, version in sorted(newest.items())
                 if locked.get(normalise(name)) != version]
        print("moved since the lock: " + (", ".join(moved) or "nothing"), flush=True)
        result = subprocess.run([str(python), *TEST_COMMAND, *(args.pytest_args or ["tests"])], cwd=REPO)
    print(f"the suite on the newest releases: {'passed' if result.returncode == 0 else 'FAILED'}"
          + ("" if result.returncode == 0 else " (see above; the lock still holds the tested set)"))
    sys.exit(result.returncode)


def wheels(args) -> None:
    """Every locked package as a wheel (deepspeed, an sdist, is built into one), without torch's CUDA stack and
    without flash-attn, which builds against the GPU machine's CUDA toolkit."""
    pins = [f"{name}=={version}" for name, version in locked_versions().items()
            if not TORCH_STACK.match(name) and name != "flash-attn"]
    if not pins:
        raise ConfigError(f"{CONSTRAINTS} is missing or empty: run python -m tools.deps lock")
    install = (f"pip install --no-index --find-links {args.folder} -r requirements.txt -r requirements-gpu.txt "
               "-c constraints.txt  # flash-attn: pip install flash-attn --no-build-isolation, with its CUDA toolkit")
    if args.dry_run:
        print(f"would fetch {len(pins)} wheels into {args.folder}/: pip wheel --no-deps {' '.join(pins)}")
    else:
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(args.folder), *pins])
    print(f"then, on the machine without internet, with its CUDA torch installed, in this folder:\n    {install}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("lock", help="rewrite constraints.txt").set_defaults(run=lock)
    latest = commands.add_parser("check-latest", help="run the suite on the newest releases")
    latest.add_argument("pytest_args", nargs="*", help="what pytest runs instead of tests/ (e.g. tests/test_serve.py -x)")
    latest.set_defaults(run=check_latest)
    wheel = commands.add_parser("wheels", help="download the locked wheels into a folder")
    wheel.add_argument("folder", type=Path)
    wheel.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")
    wheel.set_defaults(run=wheels)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
