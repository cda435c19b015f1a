"""The training process of the Slicer module: started without a console window, read as it runs, stopped whole.

``PythonSlicer`` is a launcher: it sets up the environment and starts the real Python as its child. Stopping
only the launcher (``Popen.terminate`` / ``kill``) leaves that child training. So a cancel here stops the
whole process tree, as MONAIAuto3DSeg does (``psutil`` children, recursively): first politely (SIGTERM; the
trainer stops at its next step and writes nothing, see ``tune_cli``), then, ``grace`` seconds later, by a
kill of every process still running. On POSIX the process also starts in its own session, so a grandchild
that lost its parent is still found through the process group.

On Windows the console window is hidden the way ``slicer.util.launchConsoleProcess`` does it (a
``STARTUPINFO`` with ``SW_HIDE``), and ``CREATE_NO_WINDOW`` keeps the launcher's own child windowless too.
This module is plain Python (psutil, no Slicer), so it is tested with a fake launcher.
"""
from __future__ import annotations

import codecs
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

CREATE_NO_WINDOW = 0x08000000  # Windows process creation flag: console application without a window
STARTF_USESHOWWINDOW, SW_HIDE = 1, 0


def popen_hidden(command: Sequence[str], env: Optional[Dict[str, str]] = None, cwd=None) -> subprocess.Popen:
    """Start ``command`` with stdout and stderr on one binary pipe; no console window on Windows."""
    options = {}
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags, info.wShowWindow = STARTF_USESHOWWINDOW, SW_HIDE
        options.update(startupinfo=info, creationflags=CREATE_NO_WINDOW)
    else:
        options.update(start_new_session=True)  # its own process group: see kill_tree
    return subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            **options)


def alive(process: psutil.Process) -> bool:
    """True while the process runs code (a zombie, which only waits to be reaped, does not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_all(processes, method: str) -> None:
    for process in processes:
        try:
            getattr(process, method)()
        except psutil.NoSuchProcess:
            pass


class ProcessTree:
    """The processes started by one command, remembered so that they can be stopped after the launcher is gone."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self._known: Dict[int, psutil.Process] = {}
        self._group = popen.pid if os.name != "nt" else None  # start_new_session: the group id is the pid

    def members(self) -> List[psutil.Process]:
        """Every process of the tree seen so far that still runs; descendants are looked up again each call,
        so children are remembered while the launcher lives (call it often: ``TrainingRun.running``)."""
        if self.popen.poll() is None and self.popen.pid not in self._known:
            try:
                self._known[self.popen.pid] = psutil.Process(self.popen.pid)
            except psutil.NoSuchProcess:
                pass
        for process in list(self._known.values()):
            try:
                for child in process.children(recursive=True):
                    self._known.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
        return [p for p in self._known.values() if alive(p)]

    def terminate(self) -> None:
        """Ask every process to stop (SIGTERM; on Windows this already ends them)."""
        _signal_all(self.members(), "terminate")

    def kill(self) -> None:
        """Kill every process still running, and the process group on POSIX."""
        _signal_all(self.members(), "kill")
        if self._group is not None:
            try:
                os.killpg(self._group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def running(self) -> bool:
        return self.popen.poll() is None or bool(self.members())


class TrainingRun:
    """A training process; a thread reads its output into a queue, ``poll()`` (from a timer) returns new lines.

    ``tune_cli`` prints JSON lines: ``{"progress": f, "message": m}``, then ``{"result": ...}``,
    ``{"error": m}`` or ``{"cancelled": m}``; other lines (logs, "NN%" text progress) are kept as they are.
    ``cancel()`` stops the whole process tree (see the module docstring): SIGTERM, then a kill ``grace``
    seconds later for whatever still runs.
    """

    _PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%")
    GRACE = 30.0  # seconds between the polite stop (stop at the next step) and a kill

    def __init__(self, command, env, workdir, outputDir, grace: Optional[float] = None):
        self.command, self.workdir, self.outputDir = command, workdir, Path(outputDir)
        self.grace = self.GRACE if grace is None else float(grace)
        self.fraction, self.lines, self.cancelled = 0.0, [], False
        self.result = self.error = None
        self._killAt = None
        self._queue = queue.Queue()
        self.process = popen_hidden(command, env=env, cwd=workdir)
        self.tree = ProcessTree(self.process)
        self._reader = threading.Thread(target=self._read, name="medfm-train-output", daemon=True)
        self._reader.start()

    def _read(self):
        """Split the output on "\n" and "\r" as it arrives (tqdm ends its updates with "\r")."""
        decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
        while True:
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                break
            *lines, pending = re.split(r"[\r\n]", pending + decoder.decode(chunk))
            for line in lines:
                self._queue.put(line.rstrip())
        self._queue.put((pending + decoder.decode(b"", final=True)).rstrip())
        self.process.stdout.close()

    def _parse(self, line):
        """The line to show; records progress, result and error."""
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                if "progress" in record:
                    self.fraction = min(max(float(record["progress"]), 0.0), 1.0)
                    return f"{100 * self.fraction:5.1f}% {record.get('message', '')}"
                self.result = record.get("result", self.result)
                self.error = record.get("error") or record.get("cancelled") or self.error
                return self.error or line
        match = self._PERCENT.search(line)
        if match:
            self.fraction = min(float(match.group(1)) / 100.0, 1.0)
        return line

    def poll(self):
        new = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line:
                new.append(self._parse(line))
        self.lines.extend(new)
        return new

    def running(self):
        """True while any process of the tree runs or output is still being read; kills after the grace time."""
        if self._killAt is not None and time.monotonic() > self._killAt:
            self.tree.kill()
        self.process.poll()  # reap the launcher
        return self.tree.running() or self._reader.is_alive()

    @property
    def returncode(self):
        return self.process.poll()

    def cancel(self):
        """Ask every process of the tree to stop (nothing is written); what still runs ``grace`` s later is killed."""
        self.cancelled = True
        self.tree.terminate()
        if self._killAt is None:
            self._killAt = time.monotonic() + self.grace

    def cleanup(self):
        import shutil
        shutil.rmtree(self.workdir, ignore_errors=True)
