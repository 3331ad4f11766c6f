"""`make bench-shards`: entry point of the packing benchmark, bench/shards.py."""

from bench.shards import main
from common.cli import run_main

if __name__ == "__main__":
    run_main(main)
