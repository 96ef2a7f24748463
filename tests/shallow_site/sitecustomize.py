"""Put on PYTHONPATH (conftest.py's ``shallow_subprocesses`` fixture), this makes every Python
process a test starts (a benchmark's isolated workers, torchrun's ranks) build the shallow
ResNet of tests/shallow.py in place of ResNet-101, as ``shallow`` does in the test's own process.
"""
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from shallow import shallow_resnet  # noqa: E402

# Entered for the life of the process; the module keeps the reference, so the patch is never
# undone by the context manager being collected.
_PATCH = shallow_resnet()
_PATCH.__enter__()
