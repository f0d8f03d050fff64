import os
import sys

# Tests import the repository's packages and the shared toy fixtures in tests/.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
