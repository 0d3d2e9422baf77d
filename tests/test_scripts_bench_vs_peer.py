"""scripts/bench_vs_peer.py's glam worker: times glam's step in a process of its own, honouring --gin."""
import json
import os
import sys

import gin
import pytest

from cli_helpers import REPO, run_script

sys.path.insert(0, os.path.join(REPO, "scripts"))


def test_glam_worker_times_the_step_of_the_shape_its_gin_bindings_give():
  import bench_vs_peer
  from glam import config
  from glam.models.lm import DecoderLM
  from glam.models.summary import abstract_model, flops_per_token

  bindings = ["DecoderLM.num_blocks=1", "MoeLayer.d_ff=64"]
  proc = run_script("scripts/bench_vs_peer.py", "--glam_worker", "dropless", "--steps", "1",
                    *[f"--gin={b}" for b in bindings])
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step_s"] > 0 and result["compile_s"] > 0 and result["peak"] > 0
  # the FLOPs it reports are those of the peer shape with the bindings applied, not of the full shape
  config.parse([], bench_vs_peer.SHAPE + [bench_vs_peer.DISPATCHERS["dropless"]] + bindings)
  try:
    expected = flops_per_token(abstract_model(DecoderLM), bench_vs_peer.SEQ_LEN)["train"]
  finally:
    gin.clear_config()
  assert result["flops"] == pytest.approx(expected)
  config.parse([], bench_vs_peer.SHAPE + [bench_vs_peer.DISPATCHERS["dropless"]])
  try:
    full = flops_per_token(abstract_model(DecoderLM), bench_vs_peer.SEQ_LEN)["train"]
  finally:
    gin.clear_config()
  assert result["flops"] < full / 3


def test_the_peer_runs_plain_and_under_glams_malloc_settings(monkeypatch):
  import bench_vs_peer
  # glam's own restart added the huge-page tunable after a user's tunable: "plain" drops only ours
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1")
  monkeypatch.setattr(bench_vs_peer, "HOST_MEMORY_RETAINED", False)
  environments = bench_vs_peer.peer_environments()
  assert set(environments) == {"plain", "huge_pages"}
  assert environments["plain"]["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0"
  assert environments["huge_pages"]["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
  # with glam retaining host memory the peer also gets the same mallopt settings, as tunables
  monkeypatch.setattr(bench_vs_peer, "HOST_MEMORY_RETAINED", True)
  monkeypatch.delenv("GLIBC_TUNABLES")
  retained = bench_vs_peer.peer_environments()["retained"]["GLIBC_TUNABLES"].split(":")
  assert retained[0] == "glibc.malloc.hugetlb=1" and "glibc.malloc.mmap_max=0" in retained
  assert "GLIBC_TUNABLES" not in bench_vs_peer.peer_environments()["plain"]
