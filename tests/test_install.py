"""The README's two commands do their own set-up, and the Dockerfiles install exactly as they do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make_target_recipe(target: str) -> list[str]:
    """Recipe lines of one Makefile target, as written (variables unexpanded)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_install_creates_venv_then_cpu_torch_then_package():
    recipe = _make_target_recipe("$(VENV)/.installed")
    assert recipe[0] == "$(PYTHON) -m venv $(VENV)"
    torch_step = next(i for i, line in enumerate(recipe) if "$(TORCH_REQUIREMENT)" in line)
    package_step = next(i for i, line in enumerate(recipe) if '-e ".[all]"' in line)
    assert torch_step < package_step, "torch must be installed before the package, or pip pulls a CUDA build"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH_REQUIREMENT := torch==2\.13\.0$", makefile, re.M)


@pytest.mark.parametrize("target", ["demo", "test"])
def test_readme_commands_install_first(target):
    header = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith(f"{target}:"))
    assert "install" in header.split(":", 1)[1].split()


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_quick_start_has_exactly_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    commands = [c for c in commands if not c.startswith("#")]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_exactly_as_the_makefile(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    run_lines = [line for line in text.splitlines() if line.startswith("RUN ")]
    installs = [line for line in run_lines if "pip" in line or "make" in line.split("&&")[0]]
    # One install step, and it is the Makefile's own: no pip line of its own that could drift.
    assert [line for line in run_lines if "pip " in line] == []
    assert any(re.match(r"RUN make install( TORCH_INDEX=\S*)?$", line) for line in installs), installs
    copied = " ".join(line for line in text.splitlines() if line.startswith("COPY "))
    for needed in ("pyproject.toml", "Makefile", "medssl", "bundles"):
        assert needed in copied, f"{dockerfile} does not copy {needed}"


def test_cpu_dockerfile_takes_torch_from_a_cpu_index():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    index = re.search(r"make install TORCH_INDEX=(\S+)", text)
    assert index and index.group(1).rstrip("/").endswith("/cpu")
