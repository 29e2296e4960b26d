"""Fault suite fixtures: one temp folder, one digits teacher, and the job scheduler.

The jobs the collected fault tests use (`@pytest.mark.uses(...)`) are queued when the first of
them starts, long training runs first, so they run while earlier tests wait on theirs.
Set SPOFA_FAULTS_KEEP=1 to keep the temp folder (its path is printed at the end); SPOFA_SOAK_REPORT=FILE
writes the crash soak's figures (test_soak.py) as JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import faultkit

_session = {}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "uses(*jobs): fault-suite jobs (subprocess runs) this test reads")


def _scheduler() -> faultkit.Scheduler:
    if "jobs" not in _session:
        root = Path(tempfile.mkdtemp(prefix="spofa-faults-"))
        _session["jobs"] = faultkit.Scheduler(root)
    return _session["jobs"]


def pytest_collection_finish(session) -> None:
    if session.config.option.collectonly:
        return
    wanted = []
    for item in session.items:
        for m in item.iter_markers("uses"):
            wanted += [n for n in m.args if n not in wanted]
    _session["wanted"] = wanted


def pytest_runtest_setup(item) -> None:
    """At the first fault test (not at collection: the rest of the suite must not run beside these jobs)."""
    wanted = _session.pop("wanted", None)
    if not wanted:
        return
    jobs = _scheduler()
    faultkit.start_server(jobs.root / "_io")
    jobs.submit(sorted(wanted, key=lambda n: -faultkit.PRIORITY.get(n, 0)))  # stable: test order within a priority


def pytest_terminal_summary(terminalreporter) -> None:
    """The crash soak's figures when it ran; with SPOFA_FAULTS_REPORT=1 every process the suite ran."""
    soak = faultkit.soak_report(faultkit.SOAK_SUMMARY)
    if soak:
        terminalreporter.section("crash soak")
        for line in soak:
            terminalreporter.write_line(line)
        if os.environ.get("SPOFA_SOAK_REPORT"):
            Path(os.environ["SPOFA_SOAK_REPORT"]).write_text(json.dumps(faultkit.SOAK_SUMMARY, indent=2, default=str))
    jobs = _session.get("jobs")
    if jobs is None or not os.environ.get("SPOFA_FAULTS_REPORT"):
        return
    terminalreporter.section("fault suite processes")
    for line in jobs.report():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus) -> None:
    jobs = _session.get("jobs")
    if jobs is None or jobs.closing:
        return
    jobs.close()
    if os.environ.get("SPOFA_FAULTS_KEEP"):
        print(f"\nfault suite files kept in {jobs.root}")
    else:
        shutil.rmtree(jobs.root, ignore_errors=True)


@pytest.fixture(scope="session")
def jobs() -> faultkit.Scheduler:
    return _scheduler()
