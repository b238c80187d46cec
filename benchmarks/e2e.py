"""End-to-end latency and memory: prefill and decode of a language model, floating point against the engine.

A thin script over osengine.bench (the same as `osengine bench`); what is measured and how is in that module's
docstring and in docs/deployment.md.

    python benchmarks/e2e.py --plot e2e.png --save-json e2e.json     # SmolLM2-135M, CPU: table + targets (~15 min)
    python benchmarks/e2e.py --impl fp32,w8a8 --prefill 1x512 --decode-batch 1 --repeats 3     # a quick subset
    python benchmarks/e2e.py --json > e2e.json                                 # the records (progress on stderr)
    python benchmarks/e2e.py --device cuda --random-llama7b --prefill 1x512,4x2048 --decode-batch 1,8
"""
from __future__ import annotations

import argparse
import sys

from osengine.bench import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
