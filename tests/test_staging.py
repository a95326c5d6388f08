"""Staging and commit: what a signal, a full disk or a killed build leaves on disk, and what the exit says."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundles import build_small_bundle, copy_bundle, small_masks
from test_bad_inputs import assert_one_line_error

# Runs the CLI with a signal sent to itself at an exact moment of the commit (see MODES).
SIGNAL_AT = r'''
import os, shutil, signal, sys, threading, time
mode, argv = sys.argv[1], sys.argv[2:]
real_replace, real_rmtree = os.replace, shutil.rmtree
def replace(src, dst, *args, **kwargs):  # right after the new bundle was moved into place
    real_replace(src, dst, *args, **kwargs)
    if mode == "after-commit" and ".partial-" in os.path.basename(src):  # the staging folder itself
        os.kill(os.getpid(), signal.SIGINT)
def rmtree(path, *args, **kwargs):  # while the replaced bundle (or the staging folder) is being removed
    if (mode == "removing-old" and ".old-" in str(path)) or (mode == "twice" and ".partial-" in str(path)):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    return real_rmtree(path, *args, **kwargs)
os.replace, shutil.rmtree = replace, rmtree
if mode == "twice":  # Ctrl-C while writing the bundle, and again while its staging folder is removed
    import edgecompile.bundle.store as store
    real_save_reference = store.save_reference
    def save_reference(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        return real_save_reference(*args, **kwargs)
    store.save_reference = save_reference
done = threading.Event()
def at_exit():  # while the interpreter shuts down (threading._shutdown joins this thread)
    done.wait()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
if mode == "at-exit":
    threading.Thread(target=at_exit).start()
from edgecompile.cli import main
sys.argv = ["edgecompile", *argv]  # as the console script runs it
try:
    main()
finally:
    done.set()
'''


def _run_with_signal(tmp_path: Path, mode: str, *argv) -> subprocess.CompletedProcess:
    script = tmp_path / "signal_at.py"
    script.write_text(SIGNAL_AT)
    return subprocess.run([sys.executable, str(script), mode, *map(str, argv)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def built(tmp_path_factory, st_student, router_encoder) -> Path:
    return build_small_bundle(tmp_path_factory.mktemp("staging"), st_student, router_encoder)


def test_ctrl_c_right_after_the_commit_reports_the_bundle_written(tmp_path, st_student, router_encoder):
    out = tmp_path / "bundle"
    masks = small_masks(tmp_path / "masks.safetensors")
    done = _run_with_signal(tmp_path, "after-commit", "build", st_student, "--masks", masks, "--router-encoder", router_encoder,
                            "--out", out, "-q")
    assert "Traceback" not in done.stderr and "nothing was written" not in done.stderr, done.stderr
    assert done.returncode == 0 and f"{out} is complete" in done.stderr, done.stderr
    assert json.loads((out / "manifest.json").read_text())["parity"]["passed"] and _leftovers(tmp_path) == []


def test_ctrl_c_while_removing_the_replaced_bundle_leaves_no_old_folder(tmp_path, built, st_student, router_encoder):
    out = copy_bundle(built, tmp_path / "bundle")
    masks = small_masks(tmp_path / "masks.safetensors")
    done = _run_with_signal(tmp_path, "removing-old", "build", st_student, "--masks", masks, "--router-encoder", router_encoder,
                            "--out", out, "-q", "--force")
    assert done.returncode == 0 and "Traceback" not in done.stderr and "nothing was written" not in done.stderr, done.stderr
    assert _leftovers(tmp_path) == [] and (out / "manifest.json").is_file()


def test_ctrl_c_during_interpreter_shutdown_prints_no_traceback(tmp_path):
    done = _run_with_signal(tmp_path, "at-exit", "--version")
    assert done.returncode == 0 and "version" in done.stdout
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr


def test_a_second_ctrl_c_does_not_cut_the_cleanup_short(tmp_path, st_student, router_encoder):
    out = tmp_path / "bundle"
    masks = small_masks(tmp_path / "masks.safetensors")
    done = _run_with_signal(tmp_path, "twice", "build", st_student, "--masks", masks, "--router-encoder", router_encoder,
                            "--out", out, "-q")
    assert done.returncode == 130 and "interrupted; nothing was written" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not out.exists() and _leftovers(tmp_path) == []


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "reference/outputs.safetensors")


def test_disk_full_is_one_line_exit_4_and_leaves_nothing(cli, tmp_path, monkeypatch, st_student, router_encoder):
    """ENOSPC simulated in the writer (OSError from Python, SafetensorError from the Rust writer)."""
    import onnx_ir
    import safetensors.numpy
    from safetensors import SafetensorError

    from edgecompile.bundle import store

    masks = small_masks(tmp_path / "masks.safetensors")

    def rust_no_space(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    for label, owner, name, fake in (("graphs", onnx_ir, "save", _no_space), ("reference", store, "save_reference", _no_space),
                                     ("safetensors", safetensors.numpy, "save_file", rust_no_space)):
        out = tmp_path / f"bundle_{label}"
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, fake)
            result = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", out, "-q")
        assert_one_line_error(result, "no space left on device", "nothing was written", code=4)
        assert not out.exists() and _leftovers(tmp_path) == [], label


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"], capture_output=True)
    return probe.returncode == 0


def test_disk_full_on_a_real_small_filesystem(tmp_path, st_student, router_encoder):
    """A 64 KiB tmpfs in a private mount namespace (needs root; skipped elsewhere)."""
    disk = tmp_path / "small_disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("needs root and unshare to mount a small tmpfs")
    masks = small_masks(tmp_path / "masks.safetensors")
    build = " ".join(map(str, [sys.executable, "-m", "edgecompile", "build", st_student, "--masks", masks,
                               "--router-encoder", router_encoder, "--out", disk / "bundle", "-q"]))
    done = subprocess.run(["unshare", "-m", "sh", "-c",
                           f"mount -t tmpfs -o size=64k tmpfs {disk} && {build}; echo exit=$? >&2; ls -A {disk}"],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == "exit=4" and len(lines) == 2, done.stderr
    assert lines[0].startswith("error: ") and "no space left on device" in lines[0] and "Traceback" not in done.stderr
    assert done.stdout.strip() == "", done.stdout  # nothing left on the full disk


def test_a_later_build_removes_staging_left_by_a_killed_build(cli, tmp_path, st_student, router_encoder):
    out = tmp_path / "bundle"
    masks = small_masks(tmp_path / "masks.safetensors")
    staging_then_wait = ("import sys, time\nfrom edgecompile.bundle.staging import Staging\n"
                         "print(Staging(sys.argv[1], force=False).root, flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", staging_then_wait, str(out)], stdout=subprocess.PIPE, text=True)
    killed = Path(proc.stdout.readline().strip())
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait(timeout=60)
    assert killed.is_dir() and _leftovers(tmp_path) == [killed.name] and killed.name.startswith(".bundle.partial-")
    stranger = tmp_path / ".bundle.partial-not-ours"  # same name pattern, but no edgecompile marker: left alone
    stranger.mkdir()
    (stranger / "file.txt").write_text("someone else's")
    code, _, err = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", out)
    assert code == 0, err
    assert f"removed {killed}" in err
    assert _leftovers(tmp_path) == [stranger.name] and (stranger / "file.txt").is_file()


def test_staging_of_a_running_build_is_never_removed(cli, tmp_path, st_student, router_encoder):
    from edgecompile.bundle.staging import Staging

    out = tmp_path / "bundle"
    masks = small_masks(tmp_path / "masks.safetensors")
    with Staging(out, force=False) as running:  # another build, still working
        code, _, err = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", out, "-q")
        assert code == 0, err
        assert running.root.is_dir()
    assert not running.root.exists() and _leftovers(tmp_path) == []
