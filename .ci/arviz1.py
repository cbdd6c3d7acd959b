"""The trace, report and engine tests once more under ArviZ 1.x, in a venv of its own.

ArviZ 1.x (``xarray.DataTree`` traces) declares Python >= 3.12 but installs and runs on 3.11;
pip on 3.11 resolves ArviZ 0.x for the main environment, so this builds a second one (kept in
``.venv-arviz1`` and reused) and runs the tests whose code paths differ between the two.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-arviz1"
PYTHON = VENV / "bin" / "python"
ARVIZ = ["arviz==1.3.0", "arviz-base", "arviz-stats", "numpy<2.5", "scipy<1.18", "h5py"]
TESTS = [
    "tests/test_trace.py", "tests/test_sampling.py", "tests/test_run.py",
    "tests/test_predictive.py", "tests/test_report.py", "tests/test_convergence.py",
    "tests/test_diagnose_cli.py", "tests/test_verdict.py", "tests/test_loo.py",
    "tests/test_divergence.py", "tests/test_arviz_layout.py", "tests/test_streaming.py",
    "tests/test_sinks.py",
]  # fmt: skip


def pip(*args: str) -> None:
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", *args], cwd=ROOT, check=True)


def main() -> int:
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
        pip("-c", "constraints.txt", "torch==2.13.0")
        pip("--ignore-requires-python", *ARVIZ)
        pip("-c", "constraints.txt", "-e", ".[test]")
    version = subprocess.run(
        [str(PYTHON), "-c", "import arviz; print(arviz.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not version.startswith("1."):
        print(f"{VENV} has ArviZ {version}, not 1.x; remove it and run again", file=sys.stderr)
        return 1
    print(f"ArviZ {version}: {len(TESTS)} test modules", flush=True)
    return subprocess.run(
        [str(PYTHON), "-m", "pytest", "-n", "2", "-q", *TESTS], cwd=ROOT
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
