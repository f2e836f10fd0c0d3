"""The GitHub Actions workflows: valid YAML, run on the right events, and run the commands README gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def readme_commands() -> list[str]:
    """Every command line in README's ``bash`` blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [" ".join(line.split("#")[0].split()) for line in lines if line.strip() and not line.startswith("#")]


def readme_command(start: str) -> str:
    found = [c for c in readme_commands() if start in c]
    assert len(found) == 1, f"README should give one command with {start!r}: {found}"
    return found[0]


def same(command: str) -> str:
    return " ".join(command.replace("python3 ", "python ").split())


def load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(data, dict) and data.get("jobs"), f"{name} has no jobs"
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def runs(job: dict) -> list[str]:
    return [same(step["run"]) for step in job["steps"] if "run" in step]


@pytest.mark.parametrize("name", ["ci.yml", "pages.yml"])
def test_workflow_is_valid_yaml_with_named_jobs(name: str) -> None:
    data = load(name)
    for job_id, job in data["jobs"].items():
        assert job.get("name") and job.get("runs-on") and job.get("steps"), f"{name}: job {job_id} incomplete"


def test_ci_runs_readme_test_command_and_the_book_build_on_every_push_and_pull_request() -> None:
    data = load("ci.yml")
    assert {"push", "pull_request"} <= set(data["on"])
    cpu = data["jobs"]["cpu"]
    assert runs(cpu) == ["bash .ci/run"]
    script = same((ROOT / ".ci" / "run").read_text())
    test = readme_command("--nbval-lax")  # pip install -r requirements.txt && COMPANION_QUICK=1 python -m pytest ...
    install, pytest_part = (part.strip() for part in test.split("&&"))
    assert install == "pip install -r requirements.txt" and re.search(
        r"pip install [-\w ]*-r requirements\.txt", script
    )
    assert "export COMPANION_QUICK=1" in script and same(pytest_part.replace("COMPANION_QUICK=1 ", "")) in script
    build = readme_command("requirements.txt && jupyter-book build")
    assert same(build.split("&&")[-1].strip()) in script, "CI's book build is not README's"
    assert "tests/test_book_browser.py" in script


def test_gpu_job_runs_readme_gpu_command_only_where_a_runner_is_registered() -> None:
    gpu = load("ci.yml")["jobs"]["gpu"]
    assert "self-hosted" in gpu["runs-on"] and "gpu" in gpu["runs-on"]
    assert gpu["if"] == "vars.GPU_RUNNER == 'true'"  # skipped, not queued forever, without a runner
    assert same(readme_command("-m gpu tests")) in runs(gpu)


def test_pages_builds_readme_book_from_main_and_deploys_it() -> None:
    data = load("pages.yml")
    assert data["on"]["push"]["branches"] == ["main"]
    assert data["permissions"]["pages"] == "write" and data["permissions"]["id-token"] == "write"
    build = data["jobs"]["build"]
    assert same(readme_command("requirements.txt && jupyter-book build").split("&&")[-1].strip()) in runs(build)
    assert "COMPANION_QUICK" not in str(build), "the published book is built in full mode"
    upload = [s for s in build["steps"] if str(s.get("uses", "")).startswith("actions/upload-pages-artifact")]
    assert upload and upload[0]["with"]["path"] == "_build/html"
    deploy = data["jobs"]["deploy"]
    assert deploy["needs"] == "build"
    assert any(str(s.get("uses", "")).startswith("actions/deploy-pages") for s in deploy["steps"])
