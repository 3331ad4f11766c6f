"""`make bench-train`: entry point of the training-step benchmark, bench/train.py."""

from bench.train import main
from common.cli import run_main

if __name__ == "__main__":
    run_main(main)
