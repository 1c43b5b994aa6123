"""`thinkscale bench relax|reflect|serve|search|probe`: the two benchmarks, each printed as ratios against its baseline.

relax:   relax algorithms vs torch DDP (and its fp16 / PowerSGD hooks) on an emulated cluster (root).
reflect: tokens/s of sampling with fused SPRM scoring vs plain sampling, rescoring and an external RM.
serve:   requests/s, tokens/s and latency of the server, batched scheduler vs one request at a time.
search:  seconds and tokens per question of each search method against best_of_n at the same k.
probe:   linear probes of the true step labels on every layer's hidden states (the ceiling of a head).
real-model: the SPRM on SmolLM2: screen, fine-tune, fit heads, evaluate, probe, search, GRPO (hours; resumable).
"""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "relax": ("thinkscale.bench.relax_grid", "relax vs DDP on network namespaces with shaped, delayed links (root)"),
    "reflect": ("thinkscale.bench.reflect_cost", "cost of SPRM scoring: fused vs rescoring vs an external reward model"),
    "serve": ("thinkscale.bench.serve_load", "thinkscale serve under concurrent clients: continuous vs static (or one-at-a-time) scheduler"),
    "search": ("thinkscale.bench.search_wall", "wall time of each test-time search against best_of_n at the same k"),
    "probe": ("thinkscale.bench.sprm_probe", "linear probes of the true step labels on the policy's hidden states"),
    "real-model": ("thinkscale.bench.real_model", "the SPRM on a pretrained model (SmolLM2): screen, fine-tune, fit "
                                                  "heads, evaluate with bootstrap intervals, probe, search, GRPO + "
                                                  "SPR; hours, resumable"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_bench=module)


def run(args: argparse.Namespace) -> int:
    return args._bench.run(args)
