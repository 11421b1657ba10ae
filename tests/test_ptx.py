"""The CUDA kernels as a real GPU would run them, checked with no GPU (see ptx_check.py).

Every kernel specialization the backend launches is compiled to PTX with NVVM and assembled
with ptxas for sm_75, sm_86 and sm_90. No float product may be fused into a sum, and no float
instruction may be approximate or flush subnormals: either would change the bytes against
the CPU, and the simulator cannot see it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ptx_check import NO_COMPILER, TARGETS, arithmetic_problems

HERE = Path(__file__).parent


def test_kernels_compile_and_assemble_for_real_gpus_with_exact_arithmetic():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, str(HERE / "ptx_check.py")], env=env,
                          capture_output=True, text=True, cwd=HERE.parent, timeout=900)
    if done.returncode == NO_COMPILER:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    for control, flagged in report["controls"].items():
        assert flagged, f"the rules no longer flag the {control} control: they check nothing"
    assert report["problems"] == []
    names = [entry["kernel"] for entry in report["kernels"]]
    for family in ("gram", "weighted_sum", "line_gram", "line_weighted_sum", "histogram_high",
                   "histogram_low", "tie_counts", "task_vector_l1", "task_vector_merge",
                   "quantize[Q4_K]", "quantize[Q6_K]", "quantize[Q8_0]"):
        assert any(name.startswith(family) for name in names), family
    for entry in report["kernels"]:
        for target in TARGETS:
            assert entry[target]["registers"] > 0, (entry["kernel"], target)


PLAIN_SUM = """
    ld.global.f64   %fd1, [%rd1];
    mul.f64         %fd3, %fd1, %fd2;
    add.f64         %fd4, %fd3, %fd5;
"""


@pytest.mark.parametrize("ptx,flagged", [
    (PLAIN_SUM, 1),
    (PLAIN_SUM.replace("mul.f64", "mul.rn.f64"), 0),  # a rounded product is never fused
    (PLAIN_SUM.replace("add.f64", "add.rn.f64"), 0),  # nor is a rounded sum
    ("fma.rn.f64 %fd4, %fd1, %fd2, %fd3;", 1),  # NVVM fused it already
    ("fma.rn.f32 %f4, %f1, %f2, %f3;", 1),
    ("mad.rn.f32 %f4, %f1, %f2, %f3;", 1),
    ("mad.lo.s64 %rd4, %rd1, %rd2, %rd3;", 0),  # integer arithmetic is exact
    ("mul.f32 %f2, %f1, 0f3D000000;\nsqrt.rn.f32 %f3, %f2;", 0),  # product not summed
    ("mul.f32 %f2, %f1, %f0;\nmov.f32 %f3, %f2;\n@%p1 sub.f32 %f5, %f4, %f3;", 1),
    ("mul.f64 %fd2, %fd1, %fd0;\nneg.f64 %fd3, %fd2;\nadd.f64 %fd5, %fd4, %fd3;", 1),
    ("mul.f64 %fd2, %fd1, %fd0;\nadd.f64 %fd5, %fd4, %fd6;", 0),  # other registers
    ("div.rn.f32 %f3, %f1, %f2;\nsqrt.rn.f32 %f4, %f3;\nrcp.rn.f32 %f5, %f4;", 0),
    ("div.approx.f32 %f3, %f1, %f2;", 1),  # fast math
    ("div.full.f32 %f3, %f1, %f2;", 1),
    ("sqrt.approx.ftz.f32 %f4, %f3;", 1),
    ("add.ftz.f32 %f4, %f3, %f2;", 1),  # subnormals flushed to zero
])
def test_arithmetic_rules(ptx, flagged):
    assert len(arithmetic_problems(ptx)) == flagged
