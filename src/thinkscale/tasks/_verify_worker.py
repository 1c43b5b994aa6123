"""Standalone math-verify worker, run as `python -I _verify_worker.py` by `grading.py`.

Why a separate process: math-verify's own time limit uses SIGALRM, which only works on the main
thread. Off the main thread `grading.py` sends the comparison here instead: this process runs it on its
own main thread (so math-verify's limit works), and the parent kills it if it still overruns.

Protocol: one JSON object per line on stdin {"gold": str, "pred": str, "timeout": int}; one line
{"equal": bool} per request on stdout. The first line written is {"ready": true}. The file imports
nothing from thinkscale (which would pull in torch) and is run with -I so that no sibling file can shadow a
standard-library module.
"""
import json
import logging
import sys


def main() -> None:
    logging.disable(logging.CRITICAL)  # math-verify logs each timeout; the parent reports them
    from math_verify import parse, verify

    def equal(gold: str, pred: str, timeout: int) -> bool:
        parsed_gold = parse(f"${gold}$", parsing_timeout=timeout)
        parsed_pred = parse(f"${pred}$", parsing_timeout=timeout)
        if not parsed_gold or not parsed_pred:
            return False
        return bool(verify(parsed_gold, parsed_pred, timeout_seconds=timeout))

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            result = equal(request["gold"], request["pred"], int(request["timeout"]))
        except Exception:  # a bad comparison is "not equal", never a dead worker
            result = False
        print(json.dumps({"equal": result}), flush=True)


if __name__ == "__main__":
    main()
