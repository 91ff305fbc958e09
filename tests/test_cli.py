"""`lordo-compile train` as a user runs it: a subprocess, tiny sizes."""

import subprocess
import sys

import pytest

TINY = ["--steps", "6", "--layers", "1", "--width", "32", "--heads", "2", "--batch-size", "2", "--seq-len", "32",
        "--val-batches", "2", "--compiler", "aot_eager", "--no-progress"]


def _train(*args, tmp_path):
    done = subprocess.run([sys.executable, "-m", "lordo_compile.cli", "train", *args, *TINY], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _table(stdout):
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("policy"))
    return {line.split()[0]: line.split() for line in lines[head + 1:] if line and not line.startswith("plot")}


def test_compare_prints_the_table_and_writes_a_png(tmp_path):
    # One process for the policies whose options the command line carries (a process each
    # cost the suite 15-20 s apiece, and each policy in it 10-20 s more: those with options of
    # their own); --policy alone runs in the tests below. The non-finite check is on by default;
    # its flag is given as a user would.
    policies = ["identity", "galore", "lordo", "cage"]
    out = _train("--compare", ",".join(policies), "--rank", "4", "--sync-every", "3", "--plot", "all.png",
                 "--on-nonfinite", "raise", tmp_path=tmp_path)
    table = _table(out)
    assert set(table) == set(policies)
    for row in table.values():
        assert 2.0 < float(row[1]) < 7.0  # val loss in nats per byte: near log(256) untrained
    assert (tmp_path / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_policy_in_compare_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lordo_compile.cli", "train", "--compare", "identity,adam8bit",
                           *TINY], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode != 0 and "unknown policy 'adam8bit'" in done.stderr


@pytest.mark.distributed
def test_workers_launch_through_torchrun_and_sync(tmp_path):
    table = _table(_train("--policy", "diloco", "--workers", "2", "--sync-every", "3", tmp_path=tmp_path))
    assert table["diloco"][3] != "0"  # bytes sent per worker


def test_inspect_diff_of_a_policy(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lordo_compile.cli", "inspect", "--example", "mlp", "--policy",
                           "eco", "--diff"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # The policy's last pass is the non-finite check (on by default), after eco's rewrite.
    assert done.stdout.startswith("--- captured\n+++ on_nonfinite\n") and "lordo.eco_requantize" in done.stdout

