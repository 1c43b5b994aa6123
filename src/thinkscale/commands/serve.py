"""`thinkscale serve`: the OpenAI API in front of a reflective model, on 127.0.0.1 by default.

    thinkscale serve                                   # the demo's model (runs/demo/grpo)
    thinkscale serve --model DIR --port 8000 --max-batch 32
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "grpo", "messages": [{"role": "user", "content": "What is 7 + 5 - 3?"}], "reasoning_effort": "low"}'
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from thinkscale.commands.argtypes import positive_float, positive_int
from thinkscale.commands.model_args import (MODEL_HELP, add_model_arguments, add_sampling_arguments, device,
                                             instruction, step_delimiter)

logger = logging.getLogger(__name__)

DEMO_MODEL = Path("runs/demo/grpo")
EFFORT_HELP = "none/minimal = one sample; low/medium/high = best of 2/8/32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from thinkscale.serve.protocol import DEFAULTS as d
    from thinkscale.serve.protocol import EFFORTS

    add_model_arguments(parser, required=False,
                        model_help=f"{MODEL_HELP} (default: the demo's model, {DEMO_MODEL}, when it exists)")
    parser.add_argument("--gguf", metavar="FILE",
                        help="load the policy from this GGUF file inside the --model folder; needs the gguf extra")
    parser.add_argument("--name", help="the model id clients send as `model` (default: the --model folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--default-effort", choices=list(EFFORTS), default=d.default_effort,
                        help=f"reasoning_effort of requests that give none ({EFFORT_HELP}; default %(default)s)")
    parser.add_argument("--selection", default=d.default_selection,
                        help="how the best of k is chosen when a request does not say (any `select()` strategy, "
                             "e.g. sprm, majority, weighted, deepconf; default %(default)s)")
    parser.add_argument("--search", default=d.default_search, metavar="METHOD[:OPTIONS]",
                        help="how low/medium/high spend their k candidates when a request does not say (its "
                             "`search` field): best_of_n (k independent samples, packed with other requests), or a "
                             "search of `thinkscale eval --search` such as prune:signal=confidence or beam:width=4 "
                             "(decoded per request, fewer tokens; default %(default)s)")
    add_sampling_arguments(parser, what="default sampling", temperature=d.temperature, top_p=d.top_p)
    parser.add_argument("--max-tokens", type=positive_int, default=d.max_tokens,
                        help="completion length when a request gives none, capped by the context (default %(default)s)")
    parser.add_argument("--max-candidates", type=positive_int, default=d.max_candidates,
                        help="most rows one request may ask for: prompts x n x k (default %(default)s)")
    parser.add_argument("--max-batch", type=positive_int, default=d.max_batch,
                        help="most rows decoding together; requests join the running batch as rows free up "
                             "(default %(default)s)")
    parser.add_argument("--max-kv-tokens", type=positive_int, default=d.max_kv_tokens, metavar="N",
                        help="also bound the running rows by the KV cache they may grow to: the sum of prompt + "
                             "max_tokens over them stays <= N (rows that do not fit wait; one that never can gets "
                             "400); default: no bound beyond --max-batch")
    parser.add_argument("--scheduler", choices=("continuous", "static"), default=d.scheduler,
                        help="continuous: requests join the running batch at the next token and share one "
                             "prefill per prompt; static: the former waves (a wave decodes to its end before "
                             "the next starts, every candidate prefills its prompt), kept for comparison "
                             "(default %(default)s)")
    parser.add_argument("--max-queue", type=positive_int, default=d.max_queue,
                        help="requests that may wait; more get 429 with Retry-After (default %(default)s)")
    parser.add_argument("--no-batching", action="store_true",
                        help="decode one request at a time, with either scheduler (the baseline `thinkscale bench serve` "
                             "calls sequential)")
    parser.add_argument("--shutdown-timeout", type=positive_float, default=30.0,
                        help="seconds a SIGTERM waits for requests in flight before refusing them (default 30)")


def run(args: argparse.Namespace) -> int:
    from thinkscale.reflect.loading import check_model_arg

    if args.model is None and not DEMO_MODEL.is_dir():
        print(f"thinkscale serve: error: no --model given and no demo model at {DEMO_MODEL}; "
              "run `thinkscale demo` (about 10 minutes) or pass --model DIR", file=sys.stderr)
        return 2
    model = str(DEMO_MODEL) if args.model is None else args.model
    try:
        check_model_arg(model, args.gguf)  # "no model in DIR" and the like, one line, before anything loads
        delimiter, line = step_delimiter(args), instruction(args)
    except ValueError as error:
        print(f"thinkscale serve: error: {error}", file=sys.stderr)
        return 2
    try:
        from thinkscale.serve.app import Served, create_app
        from thinkscale.serve.protocol import ServeOptions, Settings
    except ImportError as error:  # fastapi, uvicorn or prometheus-client
        print(f"thinkscale serve: error: needs the serve extra (pip install 'thinkscale[serve]'): {error}",
              file=sys.stderr)
        return 2
    try:
        options = ServeOptions(default_effort=args.default_effort, default_selection=args.selection,
                               default_search=args.search,
                               temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                               max_candidates=args.max_candidates, max_batch=args.max_batch,
                               max_queue=args.max_queue, pack=not args.no_batching,
                               scheduler=args.scheduler, max_kv_tokens=args.max_kv_tokens)
        Settings.from_options("check", options)  # a bad default effort, selection or search fails here, in one line
    except ValueError as error:
        print(f"thinkscale serve: error: {error}", file=sys.stderr)
        return 2
    import uvicorn

    served = Served.load(model, head=args.head, device=device(args), name=args.name, gguf_file=args.gguf,
                         step_delimiter=delimiter, force_head=args.force_head, instruction=line)
    app = create_app(served, options)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    logger.info("model %r on http://%s:%d/v1 (Ctrl-C or SIGTERM stops it)", served.name, args.host, args.port)
    server.run()
    return 0
