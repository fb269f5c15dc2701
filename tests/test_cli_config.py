"""Which config `ltstudy` commands read: --configfile (or the positional CONFIG), else the one
the last real Snakemake run in the directory used (recorded by the Snakefile's onstart), else
config/config.yaml; a line on stderr says which and why whenever it was not given."""

import shutil

import pytest

from ltstudy.cli import main
from ltstudy.config import load_study
from ltstudy.configfile import LAST_CONFIG
from tests.conftest import MICRO_CONFIG, snakemake, write_config


def micro_runs() -> list[str]:
    return list(load_study(MICRO_CONFIG)[1])


@pytest.fixture
def workdir(tmp_path, monkeypatch, micro_raw):
    """A directory with two studies: config/config.yaml (one variant of the micro study under
    another name) and studies/micro.yaml (the micro study)."""
    (tmp_path / "studies").mkdir()
    shutil.copy(MICRO_CONFIG, tmp_path / "studies" / "micro.yaml")
    micro_raw["studies"][0].update(name="other", grid={**micro_raw["studies"][0]["grid"]})
    micro_raw["studies"][0]["grid"]["variant"] = ["full"]
    (tmp_path / "config").mkdir()
    write_config(tmp_path / "config" / "config.yaml", micro_raw)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_ids(capsys, *argv: str) -> tuple[list[str], str]:
    assert main(["runs", *argv]) == 0
    out, err = capsys.readouterr()
    return out.split(), err


def test_a_real_run_records_its_config_and_commands_use_it(workdir, capsys):
    target = f"{load_study(MICRO_CONFIG)[1]['micro/full-micro-64']['data_dir']}/manifest.json"
    snakemake(workdir, "--configfile=studies/micro.yaml", "-n", "--", target)
    assert not (workdir / LAST_CONFIG).exists()  # a dry run is not a run
    snakemake(workdir, "--configfile=studies/micro.yaml", "--", target)  # one small job
    assert (workdir / LAST_CONFIG).read_text() == "studies/micro.yaml\n"

    runs, err = run_ids(capsys)
    assert runs == micro_runs()
    assert err == (
        "using studies/micro.yaml (the last Snakemake run here; --configfile to choose)\n"
    )
    assert main(["status"]) == 0
    out, err = capsys.readouterr()
    assert "using studies/micro.yaml" in err and f"{len(micro_runs())} pending" in out


def test_explicit_config_wins_without_a_note(workdir, capsys):
    (workdir / LAST_CONFIG).parent.mkdir()
    (workdir / LAST_CONFIG).write_text("studies/micro.yaml\n")
    for argv in (["--configfile", "config/config.yaml"], ["config/config.yaml"]):
        runs, err = run_ids(capsys, *argv)
        assert runs == ["other/full-micro-64"] and err == ""
    assert main(["validate", "--configfile=config/config.yaml", "config/config.yaml"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(["runs", "--configfile", "config/config.yaml", "studies/micro.yaml"])
    assert exit.value.code == 2
    assert "CONFIG studies/micro.yaml and --configfile config/config.yaml differ" in (
        capsys.readouterr().err
    )


def test_without_a_recorded_run_the_default_is_named(workdir, capsys):
    runs, err = run_ids(capsys)
    assert runs == ["other/full-micro-64"]
    assert err == (
        "using config/config.yaml (the default; no Snakemake run recorded here; "
        "--configfile to choose)\n"
    )


def test_a_recorded_config_that_is_gone_falls_back_to_the_default(workdir, capsys):
    (workdir / LAST_CONFIG).parent.mkdir()
    (workdir / LAST_CONFIG).write_text("studies/deleted.yaml\n")
    runs, err = run_ids(capsys)
    assert runs == ["other/full-micro-64"]
    assert "using config/config.yaml (the default; the last Snakemake run's " in err
    assert "studies/deleted.yaml is gone" in err


def test_every_config_command_takes_configfile(workdir, capsys):
    assert main(["plan", "--configfile", "studies/micro.yaml", "--summary"]) == 0
    assert main(["stage", "train", "nope/run", "--configfile", "studies/micro.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown run 'nope/run'" in err and "using" not in err
