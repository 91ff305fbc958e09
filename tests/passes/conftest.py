import os
import sys

# Pass tests share tests/common.py with the rest of the suite.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
