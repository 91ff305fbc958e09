import os
import sys

# Composition tests reuse tests/common.py and the eager references of the pass tests.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _TESTS)
sys.path.insert(0, os.path.join(_TESTS, "passes"))
