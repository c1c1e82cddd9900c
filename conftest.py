"""
The tests: the test_*.py files beside the code, one per concern; testlib.py holds what they share.
All of them, CPU, tiny configs: python -m pytest -q
(GPU-only tests skip cleanly without CUDA; tests of the real HH file skip only when ../shared is
missing.)
"""
import os

from testlib import SHARED

# the tokenizer cache beside the repo, unless one is set: then no test downloads it
if not os.environ.get("TIKTOKEN_CACHE_DIR") and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")
