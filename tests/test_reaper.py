"""The reaper (distpose/reaper.py): what a driver that started its own Ray started dies with it when the driver is
killed outright, and is left to the driver's own shutdown when it ends normally. A stand-in driver starts a child
that starts a grandchild, as a driver starts its raylet and the raylet its workers; Ray itself is in
tests/test_exact_resume.py."""

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from distpose.reaper import GIVE_UP_S, LOOK_EVERY_S

DRIVER = """
import os, subprocess, sys, time
from distpose.cluster import own_temporary_files
with own_temporary_files(True):
    open(os.path.join(os.environ["TMPDIR"], "a-file-ray-left"), "w").close()
    subprocess.Popen([sys.executable, "-c",
                      "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
                      "time.sleep(120)']); time.sleep(120)"])
    print("started", os.environ["TMPDIR"], flush=True)
    time.sleep(float(sys.argv[1]))
"""


def start_driver(lives_s: float) -> tuple[subprocess.Popen, psutil.Process, list[psutil.Process], Path]:
    """The stand-in driver, once its child and grandchild run and the reaper has had time to see them; and its
    temporary directory."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(lives_s)], stdout=subprocess.PIPE, text=True)
    assert driver.stdout is not None
    said, directory = driver.stdout.readline().split()
    assert said == "started" and Path(directory).is_dir()
    deadline = time.monotonic() + 10
    while len(descendants := psutil.Process(driver.pid).children(recursive=True)) < 3:  # reaper, child, grandchild
        assert time.monotonic() < deadline, descendants
        time.sleep(0.05)
    time.sleep(3 * LOOK_EVERY_S)
    reaper = next(p for p in descendants if "distpose.reaper" in " ".join(p.cmdline()))
    return driver, reaper, [p for p in descendants if p != reaper], Path(directory)


def test_what_a_killed_driver_started_is_killed_and_its_temporary_files_removed():
    driver, reaper, started, directory = start_driver(120)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed_at = time.monotonic()
    _, alive = psutil.wait_procs(started, timeout=GIVE_UP_S + 5)
    print(f"\n{len(started)} processes of a SIGKILLed driver gone after {time.monotonic() - killed_at:.2f} s")
    assert alive == []
    reaper.wait(timeout=10)
    assert not directory.exists()


def test_a_driver_that_ends_normally_leaves_its_processes_to_its_own_shutdown():
    driver, reaper, started, directory = start_driver(3)
    try:
        assert driver.wait(timeout=30) == 0
        reaper.wait(timeout=GIVE_UP_S + 5)
        assert all(p.is_running() for p in started)
        assert not directory.exists()  # removed by the driver itself
    finally:
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
