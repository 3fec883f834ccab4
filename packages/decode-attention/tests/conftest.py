import sys
from pathlib import Path

# _attention_helpers sits beside the tests (a unique name: tests of sibling packages may run in one session).
sys.path.insert(0, str(Path(__file__).parent))
