"""`glam` restarts itself once so that glibc's malloc backs large blocks with transparent huge pages."""
import json
import os
import subprocess
import sys

import pytest

from cli_helpers import REPO
from glam.train import huge_pages

USABLE = huge_pages.glibc_has_hugetlb_tunable() and huge_pages.transparent_huge_page_mode() == "madvise"
needs_madvise_thp = pytest.mark.skipif(not USABLE, reason="needs glibc >= 2.35 and transparent huge pages "
                                                          "in madvise mode")

# Re-executes as `glam` does, then mallocs and touches 64 MiB and reports how much of this
# process's anonymous memory the kernel backs with huge pages, before and after.
PROBE = """
import ctypes, json, os, sys
from glam.train.huge_pages import reexec_with_huge_pages
reexec_with_huge_pages()
def huge_kib():
  with open("/proc/self/smaps_rollup") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = huge_kib()
size = 64 << 20
block = libc.malloc(ctypes.c_size_t(size))
ctypes.memset(block, 1, size)
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "huge_kib_gained": huge_kib() - before}))
"""


def probe(extra_env: dict, *args: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GLAM_HUGE_PAGES")}
  process = subprocess.Popen([sys.executable, "-c", PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**env, **extra_env})
  stdout, stderr = process.communicate(timeout=60)
  assert process.returncode == 0, stderr[-2000:]
  result = json.loads(stdout.strip().splitlines()[-1])
  assert result["pid"] == process.pid  # replaced in place: a supervisor's process id stays valid
  return result


@needs_madvise_thp
def test_restarts_once_with_the_tunable_and_large_blocks_get_huge_pages():
  on, off = probe({}, "a", "--b=c d"), probe({"GLAM_HUGE_PAGES": "0"}, "a")
  assert on["argv"] == ["a", "--b=c d"]  # arguments survive the restart unchanged
  assert on["tunables"] == huge_pages.TUNABLE and off["tunables"] is None
  assert on["huge_kib_gained"] >= 2048 and off["huge_kib_gained"] == 0


@needs_madvise_thp
def test_keeps_the_users_other_tunables():
  assert probe({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["tunables"] == \
      f"glibc.malloc.arena_max=2:{huge_pages.TUNABLE}"
  # a user's own hugetlb choice wins: no restart, nothing added
  assert probe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["tunables"] == "glibc.malloc.hugetlb=0"


def test_kernel_mode_parsing(tmp_path):
  setting = tmp_path / "enabled"
  setting.write_text("always [madvise] never\n")
  assert huge_pages.transparent_huge_page_mode(str(setting)) == "madvise"
  setting.write_text("[always] madvise never\n")
  assert huge_pages.transparent_huge_page_mode(str(setting)) == "always"
  assert huge_pages.transparent_huge_page_mode(str(tmp_path / "missing")) is None


def test_glibc_version_check(monkeypatch):
  monkeypatch.setattr(huge_pages.platform, "system", lambda: "Linux")
  for libc, expected in ((("glibc", "2.36"), True), (("glibc", "2.34"), False), (("glibc", ""), False),
                         (("musl", "1.2"), False)):
    monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda libc=libc: libc)
    assert huge_pages.glibc_has_hugetlb_tunable() is expected, libc


def test_importing_a_benchmark_leaves_the_importer_alone():
  # The scripts restart in their __main__ blocks only: a test importing one must not be replaced
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GLAM_HUGE_PAGES")}
  code = "import os, sys; sys.path.insert(0, 'scripts'); import bench_vs_peer; print(os.environ.get('GLIBC_TUNABLES'))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "None"


def test_bad_setting_names_the_variable():
  out = subprocess.run([sys.executable, "-m", "glam", "model", "summary"], capture_output=True, text=True,
                       env={**os.environ, "GLAM_HUGE_PAGES": "yes"})
  assert out.returncode != 0 and "GLAM_HUGE_PAGES='yes': expected 0 or 1" in out.stderr
