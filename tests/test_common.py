"""common.py: one-line errors (once under torchrun), flag suggestions, atomic writes, and the
choice of precision on CPUs whose native bf16 torch may not use."""
import errno
import os
import stat
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT
from common import ArgumentParser, UserError


def raise_user_error():
    raise UserError("the thing is wrong")


@pytest.mark.parametrize("rank, shown", [(None, True), ("0", True), ("1", False)])
def test_a_user_error_is_one_line_printed_by_rank_0_only(rank, shown):
    """Every process exits with status 1; under torchrun only rank 0 prints the line, so it is
    not repeated once per process above torchrun's summary."""
    env_line = "" if rank is None else f"os.environ['RANK'] = {rank!r}; "
    code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); {env_line}"
            "from common import UserError, run_main\n"
            "def main(): raise UserError('the thing is wrong')\n"
            "run_main(main)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == ("error: the thing is wrong\n" if shown else "")


def test_gpt_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("GPT_DEBUG", "1")
    with pytest.raises(UserError, match="^the thing is wrong$"):
        common.run_main(raise_user_error)


def test_a_misspelt_flag_names_the_closest_one_in_sub_commands_too():
    parser = ArgumentParser()
    parser.add_argument("--temperature", type=float)
    modes = parser.add_subparsers(dest="mode")
    modes.add_parser("train").add_argument("--repeats", type=int)
    with pytest.raises(UserError, match="unknown flag --temprature. Did you mean --temperature"):
        parser.parse_args(["--temprature=0.5"])
    with pytest.raises(UserError, match="Did you mean --repeats"):
        parser.parse_args(["train", "--repets=3"])
    with pytest.raises(UserError, match="unrecognized arguments: --zzzzzz"):  # nothing close
        parser.parse_args(["--zzzzzz"])


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    common.atomic_write_text(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="^disk full$"):
        common.atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    common.atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_an_atomic_write_is_made_durable_before_and_after_its_rename(tmp_path, monkeypatch):
    """atomic_write fsyncs the whole new file before it renames it over the old one, then fsyncs
    the folder, so that the rename itself survives a crash; a failed fsync leaves the old file
    and no temporary one."""
    path = tmp_path / "f.txt"
    common.atomic_write_text(path, "old")
    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        info = os.fstat(fd)
        content = os.pread(fd, 100, 0) if stat.S_ISREG(info.st_mode) else "a folder"
        events.append(("fsync", info.st_ino, content))
        return fsync(fd)

    def recording_replace(src, dst):
        events.append(("rename", os.stat(src).st_ino, str(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    common.atomic_write_text(path, "new")
    new = path.stat().st_ino
    assert events == [("fsync", new, b"new"), ("rename", new, str(path)), ("fsync", tmp_path.stat().st_ino, "a folder")]

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        common.atomic_write_text(path, "newer")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("capability, isa", [("AVX2", "ALL"), ("DEFAULT", "ALL"), ("AVX512", "AVX2"),
                                             ("AVX512", "AVX512_CORE")])
def test_bf16_is_native_only_where_torch_may_use_it(monkeypatch, capability, isa):
    """An AVX2 or plain dispatch level, or a oneDNN ISA cap below AVX512-BF16, means bf16 runs
    through fp32 (slower than fp32 itself): `auto` must then pick fp32 on a CPU that has bf16."""
    monkeypatch.setattr(common, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert common.cpu_has_bf16() is False
    assert common.resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("flags, native", [({"avx2", "avx512f", "avx512_bf16"}, True), ({"avx2", "amx_bf16"}, True),
                                           ({"avx2", "avx512f"}, False), (set(), False)])
def test_bf16_is_native_with_the_cpu_flag_and_an_uncapped_torch(monkeypatch, flags, native):
    monkeypatch.setattr(common, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert common.cpu_has_bf16() is native
    assert common.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
