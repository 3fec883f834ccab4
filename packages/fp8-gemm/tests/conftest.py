import sys
from pathlib import Path

# _gemm_ref, _decoder and _minilm sit beside the tests (unique names: tests of sibling packages may run in one
# pytest, in its importlib import mode, which puts no test folder on sys.path by itself).
sys.path.insert(0, str(Path(__file__).parent))
