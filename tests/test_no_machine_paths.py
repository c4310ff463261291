"""Committed files carry no path of the machine that wrote them (tracking URIs, results,
configs): a fresh clone elsewhere must not depend on, or leak, someone's folders."""

from __future__ import annotations

import subprocess

import pytest

from sandbox import ROOT


def test_no_tracked_file_holds_this_checkouts_path():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    needles = [str(ROOT), str(ROOT.resolve())]
    leaks = []
    for name in filter(None, files):
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        text = path.read_bytes()
        if b"\0" in text[:8000]:
            continue                       # binary
        leaks += [name for n in set(needles) if n.encode() in text]
    assert not leaks, f"tracked files holding {ROOT}: {leaks}"
