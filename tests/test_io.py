"""Atomic writes: outputs honour the umask, and a failed write leaves the old file alone."""

import os
import stat

import pytest

from ltstudy.io import atomic_path, read_json, write_json
from ltstudy.results.schemas import table_frame, write_table


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the old one after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_outputs_honour_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_json(tmp_path / "status.json", {"status": "done"})
    write_table("train_curves", table_frame("train_curves", []), tmp_path / "curve.parquet")
    with atomic_path(tmp_path / "nested" / "model.bin") as tmp:
        tmp.write_bytes(b"weights")
    for name in ("status.json", "curve.parquet", "nested/model.bin"):
        assert mode(tmp_path / name) == expected, name
    assert mode(tmp_path / "nested") == 0o777 & ~mask


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("killed mid-write")
    assert read_json(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
