"""Tensor parallelism (triton_ops.parallel) on CPU: two and four processes in a gloo group, kernels under the
interpreter.

One spawn of two ranks runs every case of ``_tp_cases.CASES`` (processes and imports cost more than the cases), one
spawn of four ranks ``CASES_4`` (gated MLP and FP8Linear split in quarters, a patched Llama (prefill and a cached
step) and an FP8 Qwen3 with one kv head per rank, the refusal of 2 kv heads over 4 ranks); each of the two tests
reports every failing case. Every case compares a parallelized module or model with the same seeded one
in one process: FusedGatedMLP column-parallel with a row-parallel down projection, a whole gated MLP with its
gradients, packed gate/up weights, a patched MLP's FP8 gate/up with block scales as W8A8 GEMMs (beyond 16 rows),
FP8Linear column- and row-parallel with per-channel / per-tensor / block scales, the block-scale and head-count
errors, and small random Llama and Qwen3 models (transformers' own classes, fp32), patched (bf16 kernels and FP8) or
not, prefill + cached decode step + generate(); a small random gpt-oss, patched
(fused_moe, decode_attention with sinks) or not, its sinks sharded with the q heads and its experts by whole gate/up
pairs of their intermediate dimension, the MoE alone with bf16 and FP8 experts, the refusal of an intermediate size
the ranks do not divide; small random Qwen3-MoE (patched, a sparse and a dense layer), Qwen2-MoE (patched and
not: its shared expert split with the experts, under the block's one all-reduce) and Mixtral (unpatched) models,
their experts split by gate and up rows, a Mixtral MoE with FP8 experts. Patched models keep one packed
q/k/v GEMM per rank over its heads (PackedQKVParallel): checked per attention (local packed weight, DTensor shards
that are its rows, the GEMM = the three sharded projections, torch.save) and during the forward; packed FP8 q/k/v
with per-tensor and block scales; the packing's refusals.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
WORLD = 2
TIMEOUT_S = 240

pytest.importorskip("transformers")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available on this platform", allow_module_level=True)



def _interpreter_broken() -> bool:
    """triton < 3.7's interpreter fails on numpy >= 2.4 (triton issue 9171): a GPU machine may carry that pair, and
    these ranks run on CPU tensors under the interpreter (test_tensor_parallel_gpu.py covers the GPU)."""
    import re

    import numpy
    import triton

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:2])

    return version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)


if _interpreter_broken():
    pytest.skip("Triton's interpreter (the ranks' CPU kernels) cannot run with this numpy", allow_module_level=True)

sys.path.insert(0, str(HERE))
import _tp_cases  # noqa: E402  (the cases the ranks run; nothing heavy at import)

CASE_NAMES = sorted(_tp_cases.CASES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world: int, names: list[str], out: Path, timeout_s: float) -> list[dict]:
    """Spawn ``world`` ranks of a gloo group, each running the named cases; every rank's results."""
    import torch.multiprocessing as mp

    try:
        ctx = mp.start_processes(_tp_cases.worker, args=(world, _free_port(), str(out), names), nprocs=world,
                                 join=False, start_method="spawn")
    except (OSError, RuntimeError) as e:  # a sandbox without process spawning or sockets
        pytest.skip(f"cannot start {world} processes with a local gloo group here: {e}")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {world} ranks did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _failures(ranks: list[dict], names: list[str]) -> list[str]:
    for rank in ranks:
        assert rank["_env"]["TRITON_INTERPRET"] == "1"
        assert rank["_env"]["interpreter"] in (True, None)
    failures = []
    for name in names:
        for r, rank in enumerate(ranks):
            res = rank.get(name)
            if res is None:
                failures.append(f"rank {r} did not run {name}")
            elif not res["ok"]:
                failures.append(f"rank {r}, {name}:\n{res.get('error')}")
    return failures


# One test per world size for all its cases: pytest-xdist hands a module's tests to different workers, and each
# worker would spawn its own ranks (more CPU, and past the deadline under load). Every failing case is named.
def test_every_case_matches_one_process(tmp_path):
    failures = _failures(_run_ranks(WORLD, CASE_NAMES, tmp_path, TIMEOUT_S), CASE_NAMES)
    assert not failures, "\n\n".join(failures)


@pytest.mark.newest_only  # the two-rank spawn above covers the oldest transformers; CI pays one more spawn once
def test_four_ranks_match_one_process(tmp_path):
    # a quarter of every head group, intermediate and feature dimension per rank, the uneven LM head in four
    names = sorted(_tp_cases.CASES_4)
    failures = _failures(_run_ranks(4, names, tmp_path, TIMEOUT_S), names)
    assert not failures, "\n\n".join(failures)


def _gpt_oss(**overrides):
    import transformers

    cfg = {"hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "num_local_experts": 4,
           "num_experts_per_tok": 2, **overrides}
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(**cfg))


def test_gpt_oss_plan_shards_sinks_and_experts():
    # the split itself runs in the ranks (gpt_oss_* cases); here: the plan's entries, without a process group
    from triton_ops import parallel

    plan = parallel.tensor_parallel_plan(_gpt_oss(), 2)
    kinds = {key: type(style) for key, style in plan.items()}
    assert kinds == {"model.layers.*.self_attn.q_proj": parallel.ColwiseParallel,
                     "model.layers.*.self_attn.k_proj": parallel.ColwiseParallel,
                     "model.layers.*.self_attn.v_proj": parallel.ColwiseParallel,
                     "model.layers.*.self_attn.o_proj": parallel.RowwiseParallel,
                     "model.layers.*.self_attn": parallel.AttentionSinksParallel,
                     "model.layers.*.mlp": parallel.GptOssMoEParallel,
                     "lm_head": parallel.ColwiseParallel}, kinds
    assert list(plan).index("model.layers.*.self_attn") > list(plan).index("model.layers.*.self_attn.q_proj")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"intermediate_size": 45}, r"intermediate size 45 \(config.intermediate_size=45\) is not divisible by the "
                                r"tensor-parallel size 2"),
    ({"num_key_value_heads": 1}, r"config.num_key_value_heads=1 is not divisible by the tensor-parallel size 2"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3},
     r"config.num_attention_heads=3 is not divisible by the tensor-parallel size 2"),
])
def test_gpt_oss_uneven_split_is_refused_with_the_sizes(overrides, message):
    from triton_ops.parallel import ShardingError, tensor_parallel_plan

    with pytest.raises(ShardingError, match=message):
        tensor_parallel_plan(_gpt_oss(**overrides), 2)


def test_sparse_moe_plans_split_their_experts():
    """Qwen3-MoE with a dense layer (mlp_only_layers): an MLP entry per layer, the sparse one SparseMoEParallel;
    Mixtral: one entry for every layer; an uneven split of Qwen3-MoE's experts names moe_intermediate_size."""
    import transformers
    from triton_ops import parallel

    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 128}
    qwen = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **small, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[1]))
    plan = parallel.tensor_parallel_plan(qwen, 2)
    assert type(plan["model.layers.0.mlp"]) is parallel.SparseMoEParallel
    assert type(plan["model.layers.1.mlp"]) is parallel.GatedMLPParallel
    assert "model.layers.*.mlp" not in plan and type(plan["model.layers.*.self_attn"]) is parallel.PackedQKVParallel
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(**small, intermediate_size=32,
                                                                         num_local_experts=4, num_experts_per_tok=2))
    assert type(parallel.tensor_parallel_plan(mixtral, 2)["model.layers.*.mlp"]) is parallel.SparseMoEParallel
    three_heads = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **dict(small, num_attention_heads=6, num_key_value_heads=3), head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2))
    with pytest.raises(parallel.ShardingError, match=r"intermediate size 32 \(config.moe_intermediate_size=32\) is "
                                                     r"not divisible by the tensor-parallel size 3"):
        parallel.tensor_parallel_plan(three_heads, 3)
    # an FP8 checkpoint's block-scaled experts (their scales registered by patch_model): refused before any split
    block = qwen.model.layers[0].mlp
    block.experts.register_buffer("gate_up_scale", torch.ones(4, 1, 1), persistent=False)
    with pytest.raises(parallel.ShardingError, match="FP8 experts with 128x128 block scales"):
        plan["model.layers.0.mlp"]._partition(block, None)
    # Qwen2-MoE: its sparse block (with the shared expert) SparseMoEParallel, its dense layer GatedMLPParallel
    qwen2 = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **small, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[1]))
    plan = parallel.tensor_parallel_plan(qwen2, 2)
    assert type(plan["model.layers.0.mlp"]) is parallel.SparseMoEParallel
    assert type(plan["model.layers.1.mlp"]) is parallel.GatedMLPParallel
