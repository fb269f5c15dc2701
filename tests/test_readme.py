"""Every command of the README's Slurm and rerun sections works as written: each is read from
README.md now and run against the demo config in a scratch checkout, Snakemake commands as dry
runs through the real `slurm` profile (no Slurm needed to plan), `ltstudy` commands as they are.
The README names full-study runs; they must exist in config/config.yaml, and run here as the
demo's. Commands that would train for real on the CPU are skipped, each with its reason."""

import re
import shlex
import shutil
import subprocess

import pytest

from ltstudy.config import load_study
from tests.conftest import BIN, ROOT

SECTIONS = ("Running the full study on Slurm", "Rerunning one study, one run, one stage")
SKIPPED = {
    "source": "sets up the shell; the test runs the virtual environment's commands directly",
    "ltstudy stage": "trains or evaluates for real in this process (minutes on the CPU)",
}
DEMO_STUDY, DEMO_RUN = "demo", "demo/full-demo-512"


def section(text: str, title: str) -> str:
    body = text.split(f"\n## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def readme_commands() -> list[str]:
    """Command lines of the sections' bash blocks, and inline `snakemake ...`/`ltstudy ...`
    spans of their prose (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for title in SECTIONS:
        body = section(text, title)
        for lang, block in re.findall(r"```(\w*)\n(.*?)```", body, flags=re.S):
            if lang == "bash":
                lines = (shlex.split(line, comments=True) for line in block.splitlines())
                commands += [shlex.join(words) for words in lines if words]
        prose = re.sub(r"```.*?```", "", body, flags=re.S)
        commands += re.findall(r"`((?:snakemake|ltstudy) [^`]*)`", prose)
    return commands


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A working directory laid out like the repository, whose config/config.yaml is the demo."""
    workdir = tmp_path_factory.mktemp("readme")
    for name in ("Snakefile", "workflow"):
        (workdir / name).symlink_to(ROOT / name)
    (workdir / "slurm").symlink_to(ROOT / "slurm", target_is_directory=True)
    (workdir / "config").mkdir()
    shutil.copy(ROOT / "config" / "demo.yaml", workdir / "config" / "config.yaml")
    return workdir


def test_the_sections_have_commands():
    assert len(COMMANDS) >= 10 and any("--configfile" in c for c in COMMANDS)


def test_full_study_names_in_the_readme_exist():
    """The README's examples name full-study runs; the dry runs below use the demo's."""
    _, runs = load_study(ROOT / "config" / "config.yaml")
    text = " ".join(COMMANDS)
    for study in re.findall(r"\bstudy_(\w+)", text):
        assert any(s["study"] == study for s in runs.values()), study
    for run_id in re.findall(r"results/runs/(\w+/[^/\s]+)/", text):
        assert run_id in runs, run_id
    for run_id in re.findall(r"ltstudy stage \w+ (\S+)", text):
        assert run_id in runs, run_id


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(checkout, command):
    for prefix, reason in SKIPPED.items():
        if command.startswith(prefix):
            pytest.skip(reason)
    words = shlex.split(command)
    for i, word in enumerate(words):  # the study file a command names is the demo's too
        if word.startswith("--configfile"):
            name = word.split("=", 1)[1] if "=" in word else words[i + 1]
            shutil.copy(ROOT / "config" / "demo.yaml", checkout / name)
    demo = [re.sub(r"results/runs/\w+/[^/\s]+/", f"results/runs/{DEMO_RUN}/", w) for w in words]
    demo = [re.sub(r"^study_\w+$", f"study_{DEMO_STUDY}", w) for w in demo]
    dry_run = demo[0] == "snakemake"
    if dry_run and "-n" not in demo:
        demo.append("-n")
    proc = subprocess.run(
        [str(BIN / demo[0]), *demo[1:]],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(demo)} failed:\n{output[-3000:]}"
    if dry_run:
        assert "This was a dry-run" in output or "Nothing to be done" in output, output[-3000:]
