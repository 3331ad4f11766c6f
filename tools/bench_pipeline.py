"""`make bench-pipeline`: entry point of the loader benchmark, bench/pipeline.py."""

from bench.pipeline import main
from common.cli import run_main

if __name__ == "__main__":
    run_main(main)
