import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

# the same examples on every run (CI included): a failure is reproducible, a pass is not luck
settings.register_profile("derandomized", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("derandomized")
