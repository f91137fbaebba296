"""``convert`` never loses data: it refuses destinations that would touch SRC or the working
directory, replaces only what ``--force`` allows at the moment of the final rename, cleans up
after killed runs, and leaves nothing behind after signals or a full disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_qwenmoe.cli import main
from mlx_qwenmoe.convert import convert, destination, pipeline
from mlx_qwenmoe.errors import OutputError
from tiny_models import make_checkpoint

SLOW_CONVERT = Path(__file__).parent / "slow_convert.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    src, _ = make_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", hidden_size=64, moe_intermediate_size=64)
    return src


@pytest.fixture
def project(checkpoint, tmp_path):
    """proj/models/src (a checkpoint) beside proj/thesis.txt, as in the data-loss report."""
    src = tmp_path / "proj" / "models" / "src"
    shutil.copytree(checkpoint, src)
    (tmp_path / "proj" / "thesis.txt").write_text("four years of work")
    return src


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("dst_of, message", [
    (lambda src: src, "is the source checkpoint itself"),
    (lambda src: src.parent.parent, "contains the source checkpoint"),
    (lambda src: src.parent, "contains the source checkpoint"),
    (lambda src: src / "out", "lies inside the source checkpoint"),
])
def test_dst_that_touches_src_is_refused_even_with_force(project, dst_of, message):
    root = project.parent.parent.parent
    before = _tree(root)
    result = CliRunner().invoke(main, ["convert", str(project), str(dst_of(project)), "--force"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert _tree(root) == before


def test_dst_reached_through_a_symlink_is_refused(project):
    link = project.parent.parent.parent / "link"
    link.symlink_to(project.parent.parent)
    with pytest.raises(OutputError, match="contains the source checkpoint"):
        convert(link / "models" / "src", link, force=True)
    with pytest.raises(OutputError, match="is the source checkpoint itself"):
        convert(project, link / "models" / "src", force=True)
    assert (project / "config.json").is_file()


def test_current_directory_is_refused(checkpoint, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "config.json").write_text("{}")
    monkeypatch.chdir(work / "sub")
    for dst in (".", ".."):
        result = CliRunner().invoke(main, ["convert", str(checkpoint), dst, "--force"])
        assert result.exit_code == 2 and "current directory" in result.output, result.output
    assert (work / "config.json").is_file()


def test_dst_created_during_the_conversion_is_not_replaced(checkpoint, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    real = pipeline._copy_side_files

    def racing(model_dir, out_dir):
        dst.mkdir()  # a concurrent run, or the user, got there first
        (dst / "theirs.txt").write_text("x")
        real(model_dir, out_dir)

    monkeypatch.setattr(pipeline, "_copy_side_files", racing)
    with pytest.raises(OutputError, match="appeared while converting"):
        convert(checkpoint, dst)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(dst) == ["theirs.txt"]


def test_concurrent_conversions_to_one_dst(checkpoint, tmp_path):
    dst = tmp_path / "out"
    cmd = [sys.executable, str(SLOW_CONVERT), str(checkpoint), str(dst)]
    runs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already exists" in loser or "appeared while converting" in loser
    assert sorted(os.listdir(tmp_path)) == ["out"] and (dst / "model.safetensors").is_file()


def test_stale_partial_of_a_killed_run_is_cleaned(checkpoint, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100)
    foreign = tmp_path / ".out.partial-notapid"
    foreign.mkdir()
    convert(checkpoint, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == [".out.partial-notapid", "out"]


@pytest.mark.parametrize("sig, marker", [
    (signal.SIGINT, "@emit 1"),
    (signal.SIGTERM, "@emit 20"),
    (signal.SIGTERM, "@finish"),
])
def test_signal_during_convert_leaves_dst_absent_and_src_untouched(checkpoint, tmp_path, sig, marker):
    src = Path(shutil.copytree(checkpoint, tmp_path / "src"))
    before = _tree(src)
    proc = subprocess.Popen([sys.executable, str(SLOW_CONVERT), str(src), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == marker:
            proc.send_signal(sig)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["src"]
    assert _tree(src) == before


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")


def test_full_disk_is_one_line_naming_dst_and_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    _tmpfs(disk, "256k")
    try:
        dst = disk / "out"
        result = CliRunner().invoke(main, ["convert", str(checkpoint), str(dst)])
        assert result.exit_code == 2
        assert f"Error: {dst}: " in result.output and "bytes) needed but" in result.output, result.output
        assert os.listdir(disk) == []
        # The free-space check passes but the disk fills during the writes (someone else wrote meanwhile).
        monkeypatch.setattr(destination.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
        result = CliRunner().invoke(main, ["convert", str(checkpoint), str(dst)])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and errors[0].startswith(f"Error: {dst}: the disk filled up while writing;"), result.output
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)])
