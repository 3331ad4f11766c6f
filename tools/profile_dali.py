"""Entry point of the DALI graph profile (tools/device_check.sh), bench/profile_dali.py."""

from bench.profile_dali import main
from common.cli import run_main

if __name__ == "__main__":
    run_main(main)
