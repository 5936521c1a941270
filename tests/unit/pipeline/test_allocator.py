"""The allocator set-up of CPU ranks: jemalloc where installed, else glibc's 16 KiB mmap threshold,
never over a user's own choice; and the variables really act in a process started with them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import allocator


@pytest.mark.parametrize("found,expected", [
    ("libjemalloc.so.2", {"LD_PRELOAD": "libjemalloc.so.2"}),
    (None, {"MALLOC_MMAP_THRESHOLD_": "16384"})])
def test_jemalloc_when_installed_else_the_glibc_threshold(monkeypatch, found, expected):
    monkeypatch.setattr(allocator, "jemalloc", lambda: found)
    assert allocator.cpu_rank_environment({"PATH": "/bin"}) == expected


def test_an_existing_preload_is_kept_after_jemalloc(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc", lambda: "libjemalloc.so.2")
    assert allocator.cpu_rank_environment({"LD_PRELOAD": "libfoo.so"}) == {"LD_PRELOAD": "libjemalloc.so.2:libfoo.so"}


@pytest.mark.parametrize("environ", [
    {"MEMTRAIN_ALLOCATOR": "system"}, {"LD_PRELOAD": "/opt/lib/libtcmalloc_minimal.so.4"},
    {"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, {"MALLOC_CONF": "narenas:1"}])
def test_a_users_own_choice_wins(monkeypatch, environ):
    monkeypatch.setattr(allocator, "jemalloc", lambda: "libjemalloc.so.2")
    assert allocator.cpu_rank_environment(environ) == {}
    assert allocator.tune_this_process(environ) is False


def test_the_set_up_acts_in_a_process_started_with_it():
    """A process started with the set-up has jemalloc mapped exactly when the set-up preloads it."""
    env = allocator.cpu_rank_environment({})
    probe = ("import pathlib; maps = pathlib.Path('/proc/self/maps').read_text(); "
             "print('jemalloc' in maps)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str("LD_PRELOAD" in env)
    assert allocator.describe({}) == " ".join(f"{k}={v}" for k, v in env.items())
