"""glam/report/op_profile.py: wall-time shares of concurrent ops, phases and kinds from HLO metadata."""
import pytest

from glam.report.op_profile import kind_of, op_wall_shares, phase_of, summarize

HLO = """HloModule jit_train_step

%fused_computation.3 (param_0: f32[4,8], param_1: f32[8,2]) -> f32[4,2] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.4 (param_0.1: f32[4,8]) -> f32[4] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%param_0.1), dimensions={1}
}

ENTRY %main.9 (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %ynn_fusion.3 = f32[4,2]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation.3, metadata={op_name="jit(train_step)/jvp(mlp)/dot_general"}
  %ynn_fusion.4 = f32[4]{0} fusion(%p0), kind=kCustom, calls=%fused_computation.4, metadata={op_name="jit(train_step)/reduce_sum"}
  %bitcast_dynamic-update-slice_fusion.2 = f32[4,8]{1,0} fusion(%p0), kind=kLoop, calls=%x, metadata={op_name="jit(train_step)/transpose(jvp(mlp))/dynamic_update_slice"}
  ROOT %multiply_add_fusion.7 = f32[4,2]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%y, metadata={op_name="jit(train_step)/add"}
}
"""


def event(name, start, duration):
  return {"ph": "X", "name": name, "ts": start, "dur": duration}


def test_concurrent_ops_share_the_wall_time_they_overlap():
  events = [event("ynn_fusion.3", 0, 100), event("multiply_add_fusion.7", 50, 100),
            event("ThunkExecutor::Execute", 0, 150),  # not an op
            event("while.2", 0, 150),  # a loop: its body ops carry the time
            event("bitcast_dynamic-update-slice_fusion.2", 200, 10)]
  shares = op_wall_shares(events)
  assert shares == pytest.approx({"ynn_fusion.3": 50 + 25, "multiply_add_fusion.7": 25 + 50,
                                  "bitcast_dynamic-update-slice_fusion.2": 10})
  assert sum(shares.values()) == pytest.approx(160)  # busy wall time: 0-150 and 200-210


def test_phases_come_from_jax_autodiff_markers():
  assert phase_of("jit(train_step)/transpose(jvp(ecm,efm->ecf))/dot_general") == "backward"
  assert phase_of("jit(train_step)/jvp()/while/body/mul") == "forward"
  assert phase_of("jit(train_step)/add") == "update"


def test_kinds_from_names_and_fused_bodies():
  bodies = {"fc.dot": "  ROOT %d = dot(%a, %b)", "fc.reduce": "  ROOT %r = reduce(%a)"}
  assert kind_of("ynn_fusion.12", bodies, "fc.dot") == "matmul"
  assert kind_of("ffi_call.117") == "matmul"  # glam/kernels' sgemm
  assert kind_of("ynn_fusion.13", bodies, "fc.reduce") == "elementwise"
  assert kind_of("dot_general.337") == "matmul"
  assert kind_of("bitcast_dynamic-update-slice_fusion.19") == "data movement"
  assert kind_of("wrapped_broadcast.46") == "data movement"
  assert kind_of("concatenate_bitcast_fusion.1") == "data movement"
  assert kind_of("multiply_add_fusion.10") == "elementwise"
  assert kind_of("add_divide_fusion.1") == "elementwise"
  assert kind_of("sort.3") == "sort"


def test_summary_groups_a_traced_step_per_step():
  events = [event("ynn_fusion.3", 0, 3000), event("ynn_fusion.4", 3000, 1000),
            event("bitcast_dynamic-update-slice_fusion.2", 4000, 2500), event("multiply_add_fusion.7", 6500, 1500)]
  summary = summarize(events, HLO, steps=2, top=2)
  assert summary["busy_ms_per_step"] == pytest.approx(4.0)
  assert summary["by_phase_and_kind_ms"] == {"forward/matmul": 1.5, "backward/data movement": 1.25,
                                             "update/elementwise": 1.25}
  assert [row["op"] for row in summary["top_ops_ms"]] == ["ynn_fusion.3", "bitcast_dynamic-update-slice_fusion.2"]
  assert summary["top_ops_ms"][0]["jax"].endswith("jvp(mlp)/dot_general")
