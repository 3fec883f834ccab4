"""One-off development sweeps: the device runs behind the kernels' launch configs and design choices.

Their results are published under ``docs/benchmarks/dev/`` (raw JSON beside a Markdown summary) and in the
packages' docs; the scripts are kept so those measurements can be reproduced on a GPU. They are not the benchmark
suite (``python -m benchmarks``) and are not run by CI. Run each as a module from the repository root, e.g.

    python -m benchmarks.dev.gated_mlp all         # config sweep, then the benchmark with the winners
    python -m benchmarks.dev.gated_mlp_decode      # decode tiles: plain loads against tensor descriptors
    python -m benchmarks.dev.gated_mlp_narrow      # split-K and narrow columns for gpt-oss's 2880 x 2880
    python -m benchmarks.dev.rmsnorm_rope          # fused RMSNorm + RoPE against copy, eager and torch.compile

The packages are imported from the environment, or from this checkout's ``src`` folders (see ``benchmarks``).
Sweeps that needed a package's internal launchers were removed once their results were published; the doc that
publishes each names the commit and path of the script that produced it, to recover it with ``git show``.
"""
