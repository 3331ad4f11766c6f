"""`make bench-quality`: entry point of the quality benchmark, bench/quality.py (docs/quality.md)."""

from bench.quality import main
from common.cli import run_main
from common.config import ConfigError
from tools.eval import EVAL_USER_ERRORS

if __name__ == "__main__":
    run_main(main, extra_errors=EVAL_USER_ERRORS + (ConfigError,))
