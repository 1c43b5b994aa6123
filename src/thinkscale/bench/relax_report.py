"""Turn the relax benchmark's raw runs into numbers, a markdown report and plots.

Pure functions over the JSON the worker writes (thinkscale/bench/relax_worker.py) and the grid runner
collects (relax_grid.py); nothing here measures anything.

Repeats: every contender runs several times per cell. combine_repeats() turns its repeats into one entry
of cell["runs"]: the repeat whose mean step time is the median, with every repeat's key numbers under
"repeats". The step time and x DDP are medians over repeats, shown with their min-max; a contender with
a failed repeat is reported as failed, not averaged over the repeats that worked.

The report's terms are defined in DEFINITIONS, printed under its tables.
"""
from __future__ import annotations

import math
import statistics

from thinkscale.bench.machine import format_load
from thinkscale.bench.netem import parse_rate

BASELINE = "ddp"
SMOOTH = 5
TARGET_FRACTION = 0.75
REPEAT_NUMBERS = ("mean_step_ms", "median_step_ms", "final_loss", "eval_loss", "tx_bytes_per_step")
DEFINITIONS = f"""\
- repeats: every contender runs several times in each cell, interleaved (round 1 of every contender,
  then round 2, ...) so that slow drift of a shared machine affects all contenders alike; a contender
  with a failed repeat is reported as failed;
- step: each repeat's mean wall time of one training step on rank 0 over the timed steps (the mean, not
  the median: with communication_interval=2 or async, most steps do not communicate and the median
  would hide the ones that do); the table shows the median over repeats and their min-max in brackets;
  the median column is the median over repeats of each repeat's median step;
- spread: (max - min) / median of the repeats' step times;
- x DDP: median step / DDP's median step in the same cell (lower is faster);
- the other columns (first step, bytes, losses, steps to target) are those of the repeat with the median
  step time (of an even count, the faster of the middle two);
- MB/step: bytes each rank sent per step, counted at its network interface (max over ranks);
- ideal comm: those bytes at the link's nominal rate (what a perfect implementation would spend on the
  wire, ignoring latency and overlap);
- target loss: DDP's loss (mean over ranks, running mean over {SMOOTH} steps) at 3/4 of the run; DDP's
  loss curve does not depend on the network, so this is one number per workload and configuration;
- to target: steps until a contender's smoothed loss first reaches the target, times its median step
  (one-off costs such as the quantizer's first compile are left out; the first step is reported apart).
"""


def running_mean(values: list[float], window: int = SMOOTH) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def target_loss(baseline_losses: list[float]) -> float:
    """The baseline's smoothed loss at TARGET_FRACTION of its run."""
    smooth = running_mean(baseline_losses)
    return smooth[max(0, math.ceil(TARGET_FRACTION * len(smooth)) - 1)]


def steps_to_target(losses: list[float], target: float) -> int | None:
    """1-based step at which the smoothed loss first is <= target; None if never (or loss not finite)."""
    for i, value in enumerate(running_mean(losses)):
        if math.isfinite(value) and value <= target:
            return i + 1
    return None


def ideal_comm_ms(bytes_per_step: float | None, rate_bps: int | None) -> float | None:
    if bytes_per_step is None or not rate_bps:
        return None
    return 1000 * bytes_per_step * 8 / rate_bps


# ----- repeats ---------------------------------------------------------------------------------------
def repeat_numbers(result: dict) -> dict:
    """What a contender's entry keeps of each repeat: its key numbers, or its error's headline."""
    if "error" in result:
        return {"error": error_headline(result["error"])}
    return {key: result.get(key) for key in REPEAT_NUMBERS}


def median_index(values: list[float]) -> int:
    """Index of the median value (the lower one of an even count: a value that was measured)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[(len(values) - 1) // 2]


def combine_repeats(results: list[dict]) -> dict:
    """One contender's entry of cell["runs"] from its repeats (worker results or {"error": ...}, in round
    order): the repeat of median mean step time plus "repeat_index" and every repeat's numbers under
    "repeats"; if a repeat failed, its error plus "failed_repeat" (1-based) and "repeats"."""
    numbers = [repeat_numbers(result) for result in results]
    failed = [i for i, result in enumerate(results) if "error" in result]
    if failed:
        return {"error": results[failed[0]]["error"], "failed_repeat": failed[0] + 1, "repeats": numbers}
    chosen = median_index([result["mean_step_ms"] for result in results])
    return {**results[chosen], "repeat_index": chosen, "repeats": numbers}


def repeat_values(run: dict, key: str) -> list[float]:
    """`key` of each repeat of a combined run; a run saved without repeats counts as one."""
    return [r[key] for r in run.get("repeats", [run])]


def failure_headline(run: dict) -> str:
    """One line for a failed contender: which repeat failed, and why."""
    which = f"repeat {run['failed_repeat']} of {len(run['repeats'])}: " if "failed_repeat" in run else ""
    return which + error_headline(run["error"])


# ----- numbers ---------------------------------------------------------------------------------------
def summarize_run(run: dict, rate_bps: int | None, target: float | None) -> dict:
    """The per-cell numbers of one contender (a worker result, or one combined from repeats)."""
    tx = run.get("tx_bytes_per_step")
    sent = max(tx) if tx else None
    steps = steps_to_target(run["mean_loss_per_step"], target) if target is not None else None
    step_times = repeat_values(run, "mean_step_ms")
    step_ms = statistics.median(step_times)
    return {
        "step_ms": step_ms,
        "step_ms_min": min(step_times),
        "step_ms_max": max(step_times),
        "spread": (max(step_times) - min(step_times)) / step_ms if step_ms else None,
        "repeats": len(step_times),
        "median_step_ms": statistics.median(repeat_values(run, "median_step_ms")),
        "first_step_ms": run["step_ms"][0],
        "mb_per_step": None if sent is None else sent / 1e6,
        "ideal_comm_ms": ideal_comm_ms(sent, rate_bps),
        "final_loss": run["final_loss"],
        "eval_loss": run["eval_loss"],
        "steps_to_target": steps,
        "time_to_target_s": None if steps is None else steps * step_ms / 1000,
    }


def summarize_cell(runs: dict[str, dict], rate_bps: int | None, target: float | None = None) -> dict:
    """Numbers for every contender of one (world size, link, workload) cell, with ratios vs DDP."""
    ok = {name: run for name, run in runs.items() if "error" not in run}
    if target is None and BASELINE in ok:
        target = target_loss(ok[BASELINE]["mean_loss_per_step"])
    rows = {name: summarize_run(run, rate_bps, target) for name, run in ok.items()}
    base = rows.get(BASELINE)
    for row in rows.values():
        row["x_ddp"] = row["step_ms"] / base["step_ms"] if base else None
        row["loss_vs_ddp"] = (row["final_loss"] / base["final_loss"] - 1
                              if base and base["final_loss"] and math.isfinite(row["final_loss"]) else None)
    errors = {name: failure_headline(run) for name, run in runs.items() if "error" in run}
    return {"target_loss": target, "rows": rows, "errors": errors}


def winner(cell: dict, key: str, exclude: tuple = ()) -> str | None:
    """Contender with the smallest `key` (step_ms or time_to_target_s) in a summarized cell."""
    candidates = [(row[key], name) for name, row in cell["rows"].items()
                  if row.get(key) is not None and name.split(":")[0] not in exclude]
    return min(candidates)[1] if candidates else None


# ----- text ----------------------------------------------------------------------------------------
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def step_with_range(row: dict) -> str:
    """'812.0 (795.3-830.1)': the median step over repeats and its min-max; the median alone for one repeat."""
    median = _fmt(row["step_ms"], ".1f")
    if row["repeats"] < 2:
        return median
    return f"{median} ({_fmt(row['step_ms_min'], '.1f')}-{_fmt(row['step_ms_max'], '.1f')})"


def spread_text(row: dict) -> str:
    if row["repeats"] < 2 or row["spread"] is None:
        return "-"
    return f"{100 * row['spread']:.1f}%"


def repeats_note(rows: dict) -> str:
    """How a cell's step times were taken: 'median of 3 repeats (min-max)', 'median of 2-3 repeats
    (min-max)' when contenders differ (a grid resumed with a new --repeats), or 'one run each'."""
    counts = sorted({row["repeats"] for row in rows.values()})
    if not counts or counts[-1] < 2:
        return "one run each"
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"median of {span} repeats (min-max)"


def cell_table(cell: dict) -> str:
    head = ("| contender | step ms (min-max) | spread | x DDP | median ms | first step ms | MB/step/rank "
            "| ideal comm ms | loss | loss vs DDP | eval loss | steps to target | to target s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in cell["rows"].items():
        lines.append(
            f"| {name} | {step_with_range(r)} | {spread_text(r)} | {_fmt(r['x_ddp'], '.2f')} "
            f"| {_fmt(r['median_step_ms'], '.1f')} | {_fmt(r['first_step_ms'], '.0f')} "
            f"| {_fmt(r['mb_per_step'], '.1f')} | {_fmt(r['ideal_comm_ms'], '.1f')} | {_fmt(r['final_loss'], '.4f')} "
            f"| {_fmt(None if r['loss_vs_ddp'] is None else 100 * r['loss_vs_ddp'], '+.1f')}% "
            f"| {_fmt(r['eval_loss'], '.4f')} | {_fmt(r['steps_to_target'], 'd', 'not reached')} "
            f"| {_fmt(r['time_to_target_s'], '.2f')} |")
    for name, error in cell["errors"].items():
        lines.append(f"| {name} | FAILED: {error[:120].replace('|', '/')} |" + " |" * (head.count("|") - 3))
    return "\n".join(lines)


def error_headline(text: str) -> str:
    """The line of a failed run's log that says what went wrong (not the last C++ stack frame)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()] or ["?"]
    # the first error line is the cause; later ones are the launcher reporting the consequences
    telling = [ln for ln in lines if "Error" in ln or "Exception" in ln or "error" in ln]
    return telling[0] if telling else lines[-1]


def markdown(report: dict) -> str:
    """The whole report: machine, configuration, one table per cell, winners."""
    m = report["machine"]
    out = ["# relax vs DDP on an emulated network", "",
           f"Machine: {m['cpu_model']} x {m['cpu_count']} CPUs, torch {m['torch']}, Python {m['python']}, "
           f"{m['platform']}; load average at start {format_load(m['load_start'])}, at end "
           f"{format_load(m.get('load_end'))}; {m['date']}.", "",
           f"Command: `{report['command']}`", ""]
    for key, cell in report["cells"].items():
        if "summary" not in cell:
            continue
        cal = cell.get("calibration") or {}
        cal_text = (f"measured TCP: RTT {cal['rtt_ms']:.2f} ms, {cal['throughput_gbit_s']:.2f} Gbit/s"
                    if "rtt_ms" in cal else "calibration failed")
        out += [f"## {cell['workload']}, {cell['world_size']} ranks, {cell['link']} ({cal_text})", "",
                f"target loss {_fmt(cell['summary']['target_loss'], '.4f')}; step times: "
                f"{repeats_note(cell['summary']['rows'])}", "", cell_table(cell["summary"]), ""]
    for workload, world_size in sorted({(c["workload"], c["world_size"]) for c in report["cells"].values()}):
        out += [f"## {workload}, {world_size} ranks: step time x DDP in every cell (medians over repeats)", "",
                overview_table(report, workload, world_size, "x_ddp", ".2f"), "",
                f"## {workload}, {world_size} ranks: seconds to the target loss", "",
                overview_table(report, workload, world_size, "time_to_target_s", ".1f"), ""]
    out += ["## Winners (fastest step / fastest to target loss)", "", winners_table(report), "",
            DEFINITIONS.strip()]
    return "\n".join(out) + "\n"


def overview_table(report: dict, workload: str, world_size: int, key: str, spec: str) -> str:
    """Contenders x cells (slowest link first, then by latency) of one summary number."""
    cells = sorted(_cells_by(report, workload, world_size),
                   key=lambda c: (c["latency_ms"], rate_sort_key(c["rate"])))
    names = list(dict.fromkeys(n for c in cells for n in c["summary"]["rows"]))
    lines = ["| contender | " + " | ".join(f"{c['rate'] or 'unshaped'} {c['latency_ms']:g} ms" for c in cells) + " |",
             "|---|" + "---|" * len(cells)]
    for name in names:
        values = [c["summary"]["rows"].get(name, {}).get(key) for c in cells]
        lines.append(f"| {short_name(name)} | " + " | ".join(_fmt(v, spec) for v in values) + " |")
    return "\n".join(lines)


def winners_table(report: dict) -> str:
    lines = ["| workload | ranks | link | fastest step (x DDP) | fastest to target |", "|---|---|---|---|---|"]
    for cell in report["cells"].values():
        s = cell.get("summary")
        if not s:
            continue
        fast, first = winner(s, "step_ms"), winner(s, "time_to_target_s")
        ratio = _fmt(s["rows"][fast]["x_ddp"], ".2f") if fast else "-"
        lines.append(f"| {cell['workload']} | {cell['world_size']} | {cell['link']} | {fast or '-'} ({ratio}) "
                     f"| {first or 'none reached'} |")
    return "\n".join(lines)


# ----- plots -----------------------------------------------------------------------------------------
def short_name(spec: str) -> str:
    """Contender label that fits a plot: 'decentralized:peer_selection_mode=shift_one,
    communication_interval=2' -> 'decentralized(shift_one,interval=2)'."""
    if ":" not in spec:
        return spec
    name, options = spec.split(":", 1)
    for long, short in (("peer_selection_mode=", ""), ("communication_interval=", "interval="),
                        ("warmup_steps=", "warmup=")):
        options = options.replace(long, short)
    return f"{name}({options})"


def _cells_by(report: dict, workload: str, world_size: int) -> list[dict]:
    return [c for c in report["cells"].values()
            if c["workload"] == workload and c["world_size"] == world_size and "summary" in c]


def plot_step_time(report: dict, workload: str, world_size: int, path: str) -> bool:
    """Step time (median over repeats, min-max bars) vs bandwidth per contender, one panel per latency.
    False if nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells_by(report, workload, world_size)
    latencies = sorted({c["latency_ms"] for c in cells})
    rates = rate_order({c["rate"] for c in cells})
    if not cells or len(rates) < 1:
        return False
    fig, axes = plt.subplots(1, len(latencies), figsize=(5.5 * len(latencies), 4.2), squeeze=False)
    contenders = list(dict.fromkeys(n for c in cells for n in c["summary"]["rows"]))
    for ax, latency in zip(axes[0], latencies):
        for name in contenders:
            xs, ys, below, above = [], [], [], []
            for i, rate in enumerate(rates):
                cell = next((c for c in cells if c["rate"] == rate and c["latency_ms"] == latency), None)
                row = cell and cell["summary"]["rows"].get(name)
                if row:
                    xs.append(i)
                    ys.append(row["step_ms"])
                    below.append(row["step_ms"] - row["step_ms_min"])
                    above.append(row["step_ms_max"] - row["step_ms"])
            if xs:  # bars: min-max over repeats
                ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=2, label=short_name(name),
                            linewidth=2.5 if name == BASELINE else 1.2)
        ax.set_xticks(range(len(rates)), [r or "unshaped" for r in rates])
        ax.set_yscale("log")
        ax.set_xlabel("link bandwidth")
        ax.set_ylabel("mean step time, median of repeats (ms, log)")
        ax.set_title(f"{workload}, {world_size} ranks, {latency:g} ms one-way")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_tradeoff_map(report: dict, workload: str, world_size: int, key: str, path: str,
                      exclude: tuple = ()) -> bool:
    """Which contender wins each (bandwidth, latency) cell: the BAGUA paper's exploration map.
    `exclude` leaves algorithms out (e.g. async, whose replicas only meet in the background)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells_by(report, workload, world_size)
    if not cells:
        return False
    latencies = sorted({c["latency_ms"] for c in cells})
    rates = rate_order({c["rate"] for c in cells})
    names = sorted({n for c in cells for n in c["summary"]["rows"]})
    colors = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(1.9 * len(rates) + 2, 1.1 * len(latencies) + 1.6))
    for yi, latency in enumerate(latencies):
        for xi, rate in enumerate(rates):
            cell = next((c for c in cells if c["rate"] == rate and c["latency_ms"] == latency), None)
            best = winner(cell["summary"], key, exclude) if cell else None
            color = colors(names.index(best) % 20) if best else (0.9, 0.9, 0.9)
            ax.add_patch(plt.Rectangle((xi, yi), 1, 1, color=color, alpha=0.55))
            if best:
                row = cell["summary"]["rows"][best]
                ratio = row[key] / cell["summary"]["rows"][BASELINE][key] if (
                    BASELINE in cell["summary"]["rows"] and cell["summary"]["rows"][BASELINE][key]) else None
                text = f"{short_name(best)}\n{'' if ratio is None else f'{ratio:.2f}x DDP'}"
            else:
                text = "no run" if cell is None else "none"
            ax.text(xi + 0.5, yi + 0.5, text, ha="center", va="center", fontsize=7)
    ax.set_xlim(0, len(rates))
    ax.set_ylim(0, len(latencies))
    ax.set_xticks([i + 0.5 for i in range(len(rates))], [r or "unshaped" for r in rates])
    ax.set_yticks([i + 0.5 for i in range(len(latencies))], [f"{lat:g} ms" for lat in latencies])
    ax.set_xlabel("bandwidth per link")
    ax.set_ylabel("one-way latency")
    what = "fastest step" if key == "step_ms" else "fastest to target loss"
    ax.set_title(f"{what}: {workload}, {world_size} ranks" + (f" (without {', '.join(exclude)})" if exclude else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def rate_sort_key(rate: str | None) -> float:
    """Slowest link first, unshaped (None) last."""
    return parse_rate(rate) or float("inf")


def rate_order(rates: set) -> list:
    return sorted(rates, key=rate_sort_key)
