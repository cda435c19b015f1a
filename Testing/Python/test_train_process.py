"""MedFMTrainLib.process: cancel stops the whole training process tree, not only the launcher.

``PythonSlicer`` is a launcher that starts the real Python as a child. The fake launcher here does the
same, and ignores SIGTERM (as a launcher that does not forward signals effectively does): after
``TrainingRun.cancel()`` both it and its child must be gone.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from MedFMTrainLib import process

CHILD_POLITE = ("import json, signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *a: (print(json.dumps({'cancelled': 'stopped'}), flush=True),"
                " sys.exit(3)))\n"
                "print(json.dumps({'progress': 0.25, 'message': 'child up'}), flush=True)\n"
                "while True: time.sleep(0.05)\n")
CHILD_STUBBORN = ("import json, signal, time\n"
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                  "print(json.dumps({'progress': 0.25, 'message': 'child up'}), flush=True)\n"
                  "while True: time.sleep(0.05)\n")
LAUNCHER = ("import json, signal, subprocess, sys\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]])\n"
            "print(json.dumps({'child': child.pid}), flush=True)\n"
            "sys.exit(child.wait())\n")


def _start(child_code, tmp_path, grace):
    workdir = tmp_path / "work"
    workdir.mkdir()
    run = process.TrainingRun([sys.executable, "-c", LAUNCHER, child_code], None, str(workdir), tmp_path / "out",
                              grace=grace)
    deadline = time.monotonic() + 30
    child = None
    while run.fraction < 0.25 and time.monotonic() < deadline:
        for line in run.poll():
            if line.startswith('{"child"'):
                child = psutil.Process(json.loads(line)["child"])
        run.running()  # as the widget's timer does: the tree is learned while the launcher lives
        time.sleep(0.02)
    assert child is not None and run.fraction == 0.25, run.lines
    return run, psutil.Process(run.process.pid), child


def _wait_stopped(run, timeout=20.0):
    deadline = time.monotonic() + timeout
    while run.running() and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.05)
    run.poll()
    return not run.running()


@pytest.mark.parametrize("child_code, expect", [(CHILD_POLITE, "polite"), (CHILD_STUBBORN, "stubborn")])
def test_cancel_stops_the_launcher_and_its_child(child_code, expect, tmp_path):
    run, launcher, child = _start(child_code, tmp_path, grace=1.0)
    assert process.alive(launcher) and process.alive(child)
    t0 = time.monotonic()
    run.cancel()
    assert _wait_stopped(run), "the training tree still runs after cancel"
    waited = time.monotonic() - t0
    assert not process.alive(launcher) and not process.alive(child), "a process of the tree survived the cancel"
    assert run.cancelled and run.returncode != 0
    if expect == "polite":  # the child stopped at SIGTERM and said so; the deaf launcher then exits with its code
        assert run.error == "stopped" and run.returncode == 3 and waited < 0.9
    else:  # nobody listens to SIGTERM: everything is killed after the grace time
        assert 0.9 < waited < 15, f"the kill came {waited:.1f} s after cancel (grace 1 s)"
    run.cleanup()
    assert not (tmp_path / "work").exists()


def test_stopping_only_the_launcher_leaves_the_child_running(tmp_path):
    """Why the tree matters: the fake launcher is faithful to the bug (its child outlives a plain kill)."""
    run, launcher, child = _start(CHILD_STUBBORN, tmp_path, grace=1.0)
    run.process.kill()
    run.process.wait(timeout=10)
    try:
        time.sleep(0.2)
        assert process.alive(child), "the child died with the launcher: this fake would not show the bug"
    finally:
        run.cancel()
        run.tree.kill()
        assert _wait_stopped(run)
    assert not process.alive(child)


def test_progress_lines_and_cancel_of_a_plain_process(tmp_path):
    script = ("import sys, time\n"
              "for p in (10, 40): print(f'tuning: {p}%|###', flush=True)\n"
              "print('{\"progress\": 0.5, \"message\": \"encoding\"}', flush=True)\n"
              "sys.stdout.write('step 5\\r 60%|####\\r'); sys.stdout.flush()\n"
              "time.sleep(60)\n")
    run = process.TrainingRun([sys.executable, "-c", script], None, str(tmp_path), tmp_path / "out", grace=5)
    lines, deadline = [], time.monotonic() + 30
    while run.fraction < 0.6 and time.monotonic() < deadline:
        lines += run.poll()
        time.sleep(0.05)
    assert run.fraction == pytest.approx(0.6) and run.running()
    assert lines[:3] == ["tuning: 10%|###", "tuning: 40%|###", " 50.0% encoding"]
    run.cancel()
    assert _wait_stopped(run) and run.cancelled and run.returncode == -15  # SIGTERM was enough: no kill


def test_windows_start_hides_the_console(monkeypatch):
    """On Windows: Slicer's launchConsoleProcess STARTUPINFO (SW_HIDE) plus CREATE_NO_WINDOW; POSIX: own session."""
    seen = {}

    class StartupInfo:
        dwFlags = wShowWindow = None

    def fake_popen(command, **options):
        seen.update(options)
        return "popen"

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    assert process.popen_hidden(["x"]) == "popen"
    assert seen["start_new_session"] is True and "creationflags" not in seen
    seen.clear()
    monkeypatch.setattr(process.os, "name", "nt")
    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    process.popen_hidden(["x"])
    assert seen["creationflags"] & 0x08000000, "CREATE_NO_WINDOW"
    assert (seen["startupinfo"].dwFlags, seen["startupinfo"].wShowWindow) == (1, 0), "STARTF_USESHOWWINDOW, SW_HIDE"
    assert "start_new_session" not in seen
