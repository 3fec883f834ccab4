"""Compile the decode step's norm kernels for sm_90 (Hopper) with Triton's own compiler and ptxas, without a GPU, as
launched with programmatic dependent launch (``triton_ops_core.pdl``: the grid-dependency instructions are inline
PTX the interpreter never sees).

Run as a script by ``test_compile_sm90.py`` in a process without ``TRITON_INTERPRET``. Prints one ``OK``/``FAIL``
line per variant; exit status 3 when this Triton has no ahead-of-time API this script knows (the test then skips).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from triton_ops_core.aot import compile_sm90  # noqa: E402

# (the ops package re-exports functions of the modules' names: import the modules themselves)
R = importlib.import_module("fused_rmsnorm_rope.ops.rmsnorm")
K = importlib.import_module("fused_rmsnorm_rope.ops.kernels")
S = importlib.import_module("fused_rmsnorm_rope.ops.sandwich")


def _types(kernel, pointers: dict[str, str], floats: tuple[str, ...]) -> dict[str, str]:
    """Every non-constexpr argument's type: the given pointers, fp32 scalars, the rest i32."""
    names = [p.name for p in kernel.params if not p.is_constexpr]
    return {n: pointers.get(n, "fp32" if n in floats else "i32") for n in names}


def main() -> int:
    ok = True
    bf16 = dict.fromkeys(["X", "R", "Y", "R_OUT", "W"], "*bf16")
    # the post-attention norm of a decode step: the residual add, one pass over a 4096-wide row
    ok &= compile_sm90(R._rmsnorm_kernel, _types(R._rmsnorm_kernel, {**bf16, "S": "*fp32"}, ("eps",)),
                       dict(HAS_RESIDUAL=True, GEMMA=False, BLOCK=4096, ONE_PASS=True, FP8_OUT=False, EMULATE=False,
                            PDL=True, RELEASE=True), "rmsnorm with the residual add, PDL", 8,
                       ptx_has=("griddepcontrol.wait", "griddepcontrol.launch_dependents"))
    # a prefill's W8A8 input: the residual add and norm with E4M3 output in 1x128 blocks, one pass and two
    fp8 = {**bf16, "Y": "*fp8e4nv", "S": "*fp32"}
    for n, one_pass in ((4096, True), (8192 + 128, False)):
        ok &= compile_sm90(R._rmsnorm_kernel, _types(R._rmsnorm_kernel, fp8, ("eps",)),
                           dict(HAS_RESIDUAL=True, GEMMA=False, BLOCK=min(n, 8192), ONE_PASS=one_pass, FP8_OUT=True,
                                EMULATE=False, PDL=False, RELEASE=False, FP8_GROUP=128),
                           f"rmsnorm with the residual add, FP8 1x128 blocks, {'one pass' if one_pass else 'two'}", 8,
                           no_spills=True, ptx_has=("cvt.rn.satfinite.e4m3x2.f32",))
    # Gemma 3's per-head QK norm and rotation in place (8 q heads and 4 k heads of 256, position ids)
    qk = {n: "*bf16" for n in ("Q", "K", "QO", "KO", "QW", "KW", "COS", "SIN")}
    ok &= compile_sm90(K._qk_norm_rope_fwd_kernel,
                       _types(K._qk_norm_rope_fwd_kernel, {**qk, "POS": "*i64", "QRSTD": "*fp32", "KRSTD": "*fp32"},
                              ("eps",)),
                       dict(NUM_Q_HEADS=8, NUM_K_HEADS=4, HEAD_DIM=256, ROT_DIM=256, Q_HEADS_PAD=8, K_HEADS_PAD=4,
                            HALF_PAD=128, PASS_PAD=1, INTERLEAVED=False, GEMMA=True, HAS_POS=True, STORE_RSTD=False,
                            ROWS_PER_PROG=1, EVEN_ROWS=True, NORM=True, TRANSPOSE=False, PDL=True),
                       "QK norm + RoPE (Gemma), PDL", 4)
    # Gemma 3's sandwich norms around the residual add
    ok &= compile_sm90(S._norm_add_norm_kernel,
                       _types(S._norm_add_norm_kernel, dict.fromkeys(["X", "R", "XW", "W", "Y", "H"], "*bf16"),
                              ("x_eps", "eps")),
                       dict(GEMMA=True, SECOND=True, BLOCK=4096, PDL=True), "norm, add, norm (Gemma), PDL", 8)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
