"""End-to-end latency and memory: prefill and decode of a language model, floating point against the engine.

A thin script over osengine.cli.bench (the same as `osengine bench`); what is measured and how is in that module's
docstring and in docs/deployment.md. In a checkout next to the shared data, calibration defaults to the WikiText-2
validation text (`--calib` overrides it); `osengine bench` itself defaults to text the model writes.

    python benchmarks/e2e.py --plot e2e.png --save-json e2e.json     # SmolLM2-135M, CPU: table + targets (~15 min)
    python benchmarks/e2e.py --impl fp32,w8a8 --prefill 1x512 --decode-batch 1 --repeats 3     # a quick subset
    python benchmarks/e2e.py --json > e2e.json                                 # the records (progress on stderr)
    python benchmarks/e2e.py --device cuda --random-llama7b --prefill 1x512,4x2048 --decode-batch 1,8
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from osengine.cli.bench import add_arguments, main

# OSENGINE_DATA names the data folder; by default the one beside the checkout (as the other benchmarks)
DATA = Path(os.environ.get("OSENGINE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
WIKITEXT_VALID = DATA / "wikitext-2" / "valid.txt"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    if WIKITEXT_VALID.is_file():
        parser.set_defaults(calib=str(WIKITEXT_VALID))
    sys.exit(main(parser.parse_args()))
