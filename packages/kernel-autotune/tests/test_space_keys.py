import pytest
import torch
from kernel_autotune import (
    ConfigSpace,
    block_fits,
    bucket_problem,
    elements_per_thread_at_most,
    make_key,
    next_pow2,
    shared_memory_fits,
    threads_at_most_block,
)
from kernel_autotune.keys import key_string, relaxed_key_string
from triton_ops_core.exceptions import InvalidArgumentError

PARAMS = {"BLOCK_SIZE": [16, 32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4]}


def test_full_product_in_declaration_order():
    space = ConfigSpace(PARAMS)
    configs = space.configs()
    assert len(configs) == space.size() == 48
    assert configs[0] == {"BLOCK_SIZE": 16, "num_warps": 2, "num_stages": 1}
    assert len({tuple(c.items()) for c in configs}) == 48
    configs[0]["BLOCK_SIZE"] = 999  # fresh dicts: mutating one does not change the space
    assert space.configs()[0]["BLOCK_SIZE"] == 16


def test_pruning_uses_the_problem_and_tolerates_none():
    space = ConfigSpace(PARAMS, constraints=[block_fits("BLOCK_SIZE", "hidden"),
                                             lambda c, p: c["num_stages"] <= 2])
    assert len(space.configs()) == 4 * 3 * 2  # no problem: only the problem-free constraint prunes
    small = space.configs({"hidden": 20})      # next_pow2(20) = 32
    assert {c["BLOCK_SIZE"] for c in small} == {16, 32}
    assert all(c["num_stages"] <= 2 for c in small)


def test_constraint_builders():
    smem = shared_memory_fits(lambda c, p: c["BLOCK_SIZE"] * 1024 * c["num_stages"], limit_bytes=128 * 1024)
    regs = elements_per_thread_at_most(["BLOCK_SIZE"], 1)
    threads = threads_at_most_block("BLOCK_SIZE")
    assert smem({"BLOCK_SIZE": 64, "num_stages": 2}, None) and not smem({"BLOCK_SIZE": 64, "num_stages": 3}, None)
    assert regs({"BLOCK_SIZE": 64, "num_warps": 2}, None) and not regs({"BLOCK_SIZE": 128, "num_warps": 2}, None)
    assert threads({"BLOCK_SIZE": 128, "num_warps": 4}, None) and not threads({"BLOCK_SIZE": 64, "num_warps": 4}, None)


def test_allows_checks_keys_and_constraints_not_the_value_lists():
    space = ConfigSpace(PARAMS, constraints=[lambda c, p: c["BLOCK_SIZE"] <= 256])
    assert space.allows({"BLOCK_SIZE": 256, "num_warps": 4, "num_stages": 1})  # not listed, still valid
    assert not space.allows({"BLOCK_SIZE": 512, "num_warps": 4, "num_stages": 1})
    assert not space.allows({"BLOCK_SIZE": 64, "num_warps": 4})  # a parameter missing


@pytest.mark.parametrize("params", [{}, {"A": []}, {"A": "abc"}, {"": [1]}])
def test_bad_spaces_raise(params):
    with pytest.raises(InvalidArgumentError):
        ConfigSpace(params)


def test_bucketing_rounds_named_dims_up_to_powers_of_two():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 5, 64, 65, 8191)] == [1, 1, 2, 4, 8, 64, 128, 8192]
    assert bucket_problem({"tokens": 33, "hidden": 2880}, ("tokens",)) == {"tokens": 64, "hidden": 2880}
    with pytest.raises(InvalidArgumentError, match="bucket"):
        bucket_problem({"tokens": 3}, ("seq",))
    with pytest.raises(InvalidArgumentError, match="tokens"):
        bucket_problem({"tokens": "many"})


def test_key_names_everything_but_the_config_list():
    k1 = make_key("k.fwd", version="1.2", problem={"tokens": 33, "hidden": 64}, dtypes=(torch.bfloat16,),
                  device="cpu", bucket=("tokens",))
    k2 = make_key("k.fwd", version="1.2", problem={"hidden": 64, "tokens": 60}, dtypes=("bfloat16",),
                  device=torch.device("cpu"), bucket=("tokens",))
    assert k1 == k2 and key_string(k1) == key_string(k2)  # same bucket, order-free, dtype spelled alike
    assert k1["device"] == "cpu-interpreter" and k1["dtypes"] == ["bfloat16"]
    import triton

    assert k1["triton"] == triton.__version__ and k1["version"] == "1.2"
    assert set(k1) == {"kernel", "version", "problem", "dtypes", "device", "capability", "triton"}
    assert k1["capability"] is None  # the CPU; a GPU's is "9.0" (test_device_selection.py)
    k3 = dict(k1, version="9", triton="0.0")
    assert key_string(k3) != key_string(k1) and relaxed_key_string(k3) == relaxed_key_string(k1)
