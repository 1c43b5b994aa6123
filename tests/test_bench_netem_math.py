"""Pure pieces of the network benchmark: rates, tbf bucket, the forwarder's schedule, report math."""
import argparse
import math

import pytest

from thinkscale.bench import relax_report as rr
from thinkscale.bench.latency_forwarder import destination_index, schedule
from thinkscale.bench.netem import Cluster, Link, parse_rate, tbf_burst_bytes


def test_parse_rate():
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("100mbit") == 10**8
    assert parse_rate("2.5gbit") == 2_500_000_000
    assert parse_rate("none") is None and parse_rate(None) is None
    for bad in ("fast", "1gb", "0mbit", "-1gbit", "gbit"):
        with pytest.raises(ValueError, match="bad rate"):
            parse_rate(bad)


def test_link_validation():
    assert Link("1gbit", 5).describe() == "1gbit, 5 ms one-way"
    with pytest.raises(ValueError, match="latency_ms"):
        Link(None, -1)
    with pytest.raises(ValueError, match="bad rate"):
        Link("1 gigabit", 0)


def test_tbf_burst():
    assert Cluster.MTU == 64000  # one MTU on every path (veth, bridge, TUN)
    # 1 Gbit/s: 2 ms of traffic = 250 000 bytes beats two 64000-byte packets
    assert tbf_burst_bytes(10**9, Cluster.MTU) == 250_000
    # 1 Mbit/s: 2 ms is 250 bytes, so two full packets (+ headers) decide
    assert tbf_burst_bytes(10**6, Cluster.MTU) == 2 * 64100


def test_schedule_latency_and_serialization():
    # idle link: 1000 bytes at 8 Mbit/s take 1 ms on the wire, then 5 ms of travel
    deliver, free = schedule(10.0, 0.0, 1000, 8e6, 0.005)
    assert free == pytest.approx(10.001) and deliver == pytest.approx(10.006)
    # a second packet handed over at the same time waits for the link
    deliver2, free2 = schedule(10.0, free, 1000, 8e6, 0.005)
    assert free2 == pytest.approx(10.002) and deliver2 == pytest.approx(10.007)
    # no rate: latency only
    assert schedule(3.0, 0.0, 10**6, None, 0.001) == (pytest.approx(3.001), 3.0)


def test_destination_index():
    header = bytearray(20)
    header[0] = 0x45  # IPv4, 20-byte header
    header[16:20] = bytes([10, 231, 77, 3])
    assert destination_index(bytes(header), bytes([10, 231, 77])) == 2
    assert destination_index(bytes(header), bytes([10, 0, 0])) is None  # another subnet
    header[0] = 0x60  # IPv6
    assert destination_index(bytes(header), bytes([10, 231, 77])) is None
    assert destination_index(b"\x45\x00", bytes([10, 231, 77])) is None  # truncated


def test_running_mean_and_target():
    assert rr.running_mean([4.0, 2.0, 6.0, 0.0, 8.0, 10.0]) == [4.0, 3.0, 4.0, 3.0, 4.0, 5.2]
    # 8 steps: target = smoothed value at step ceil(0.75 * 8) = 6
    losses = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert rr.target_loss(losses) == pytest.approx((7 + 6 + 5 + 4 + 3) / 5)
    assert rr.steps_to_target(losses, 5.0) == 6
    assert rr.steps_to_target(losses, 0.5) is None
    assert rr.steps_to_target([math.nan] * 3, 1.0) is None


def test_ideal_comm_ms():
    assert rr.ideal_comm_ms(125_000_000, 10**9) == pytest.approx(1000.0)
    assert rr.ideal_comm_ms(None, 10**9) is None and rr.ideal_comm_ms(1000, None) is None


def _run(step_ms, losses, tx, final=None):
    return {"median_step_ms": step_ms, "mean_step_ms": step_ms, "step_ms": [5 * step_ms] + [step_ms] * (len(losses) - 1),
            "mean_loss_per_step": losses, "tx_bytes_per_step": tx, "final_loss": final or losses[-1],
            "eval_loss": losses[-1]}


def test_summarize_cell_ratios_and_winners():
    losses = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    runs = {"ddp": _run(100.0, losses, [1e6, 2e6]),
            "bytegrad": _run(40.0, [x + 0.5 for x in losses], [0.5e6, 0.5e6]),
            "broken": {"error": "exit codes [1, 0]\nboom"}}
    cell = rr.summarize_cell(runs, 10**9)
    assert cell["target_loss"] == pytest.approx(5.0)
    ddp, bg = cell["rows"]["ddp"], cell["rows"]["bytegrad"]
    assert ddp["x_ddp"] == 1.0 and bg["x_ddp"] == pytest.approx(0.4)
    assert ddp["mb_per_step"] == 2.0 and ddp["ideal_comm_ms"] == pytest.approx(16.0)
    assert ddp["steps_to_target"] == 6 and bg["steps_to_target"] == 7
    assert bg["time_to_target_s"] == pytest.approx(0.28) and ddp["time_to_target_s"] == pytest.approx(0.6)
    assert bg["loss_vs_ddp"] == pytest.approx(0.5)
    assert rr.winner(cell, "step_ms") == "bytegrad" and rr.winner(cell, "time_to_target_s") == "bytegrad"
    assert "broken" in cell["errors"] and "FAILED: boom" in rr.cell_table(cell)
    assert rr.error_headline("x\nValueError: bad\n  frame #3: foo\n") == "ValueError: bad"


def test_short_name():
    assert rr.short_name("ddp") == "ddp"
    assert (rr.short_name("decentralized:peer_selection_mode=shift_one,communication_interval=2")
            == "decentralized(shift_one,interval=2)")
    assert rr.short_name("qadam:warmup_steps=5") == "qadam(warmup=5)"


def test_step_time_is_the_mean():
    """With communication every other step the median is a step without communication: ratios use the mean."""
    losses = [3.0, 2.0, 1.0, 0.5]
    periodic = {**_run(100.0, losses, [1e6]), "median_step_ms": 100.0, "mean_step_ms": 550.0}
    cell = rr.summarize_cell({"ddp": _run(500.0, losses, [1e6]), "decentralized:communication_interval=2": periodic},
                             10**9)
    row = cell["rows"]["decentralized:communication_interval=2"]
    assert row["step_ms"] == 550.0 and row["median_step_ms"] == 100.0 and row["x_ddp"] == pytest.approx(1.1)
    assert row["time_to_target_s"] == pytest.approx(row["steps_to_target"] * 0.55)


def test_overview_table_orders_cells_slowest_link_first():
    losses = [3.0, 2.0, 1.0, 0.5]
    cells = {}
    for rate, latency, ddp_ms in (("1gbit", 0.0, 100.0), ("100mbit", 0.0, 800.0), (None, 0.0, 50.0), ("1gbit", 5.0, 200.0)):
        runs = {"ddp": _run(ddp_ms, losses, [1e6]), "bytegrad": _run(ddp_ms / 2, losses, [1e6])}
        cells[f"{rate}{latency}"] = {"workload": "mlp", "world_size": 2, "rate": rate, "latency_ms": latency,
                                     "summary": rr.summarize_cell(runs, None)}
    table = rr.overview_table({"cells": cells}, "mlp", 2, "x_ddp", ".2f").splitlines()
    assert table[0] == "| contender | 100mbit 0 ms | 1gbit 0 ms | unshaped 0 ms | 1gbit 5 ms |"
    assert table[2] == "| ddp | 1.00 | 1.00 | 1.00 | 1.00 |" and table[3] == "| bytegrad | 0.50 | 0.50 | 0.50 | 0.50 |"


# ----- repeats ---------------------------------------------------------------------------------------
def _repeats(name_to_steps: dict[str, list[float]], losses=(3.0, 2.0, 1.0, 0.5)) -> dict:
    """cell["runs"] as the grid writes it: each contender combined from repeats with these mean step times."""
    return {name: rr.combine_repeats([_run(ms, list(losses), [1e6]) for ms in steps])
            for name, steps in name_to_steps.items()}


def test_combine_repeats_picks_the_median_run():
    runs = [_run(ms, [3.0, 2.0], [1e6 + ms]) for ms in (830.0, 795.0, 812.0)]
    combined = rr.combine_repeats(runs)
    assert combined["repeat_index"] == 2 and combined["mean_step_ms"] == 812.0
    assert combined["tx_bytes_per_step"] == [1e6 + 812.0]  # the curves and bytes are the median run's
    assert [r["mean_step_ms"] for r in combined["repeats"]] == [830.0, 795.0, 812.0]
    assert set(combined["repeats"][0]) == set(rr.REPEAT_NUMBERS)
    # an even count: the lower median is a run that was measured
    assert rr.median_index([4.0, 1.0, 3.0, 2.0]) == 3 and rr.median_index([7.0]) == 0


def test_single_repeat_looks_like_the_worker_result():
    run = _run(100.0, [3.0, 2.0], [1e6])
    combined = rr.combine_repeats([run])
    assert combined == {**run, "repeat_index": 0, "repeats": [rr.repeat_numbers(run)]}
    row = rr.summarize_cell({"ddp": combined}, None)["rows"]["ddp"]
    assert (row["step_ms"], row["repeats"]) == (100.0, 1)
    assert rr.step_with_range(row) == "100.0" and rr.spread_text(row) == "-"


def test_step_time_and_ratio_are_medians_over_repeats():
    cell = rr.summarize_cell(_repeats({"ddp": [120.0, 100.0, 110.0], "bytegrad": [60.0, 50.0, 56.0]}), 10**9)
    ddp, bg = cell["rows"]["ddp"], cell["rows"]["bytegrad"]
    assert (ddp["step_ms"], ddp["step_ms_min"], ddp["step_ms_max"], ddp["repeats"]) == (110.0, 100.0, 120.0, 3)
    assert bg["x_ddp"] == pytest.approx(56.0 / 110.0) and ddp["spread"] == pytest.approx(20.0 / 110.0)
    assert bg["time_to_target_s"] == pytest.approx(bg["steps_to_target"] * 0.056)
    # two repeats: the step time is their mean (the median), the other columns the faster run's
    two = rr.summarize_cell(_repeats({"ddp": [100.0, 120.0]}), None)["rows"]["ddp"]
    assert two["step_ms"] == 110.0 and two["repeats"] == 2
    table = rr.cell_table(cell)
    assert "| ddp | 110.0 (100.0-120.0) | 18.2% | 1.00 |" in table
    assert "| bytegrad | 56.0 (50.0-60.0) | 17.9% | 0.51 |" in table
    assert rr.repeats_note(cell["rows"]) == "median of 3 repeats (min-max)"
    assert rr.repeats_note({**cell["rows"], "x": {"repeats": 1}}) == "median of 1-3 repeats (min-max)"
    assert rr.repeats_note({"x": {"repeats": 1}}) == rr.repeats_note({}) == "one run each"


def test_partly_failed_repeats_are_a_failure():
    losses = [3.0, 2.0, 1.0, 0.5]
    broken = rr.combine_repeats([_run(100.0, losses, [1e6]), {"error": "exit codes [1, 0]\nValueError: boom"},
                                 _run(90.0, losses, [1e6])])
    assert broken["failed_repeat"] == 2 and "ValueError: boom" in broken["error"]
    assert broken["repeats"][1] == {"error": "ValueError: boom"} and broken["repeats"][2]["mean_step_ms"] == 90.0
    cell = rr.summarize_cell({"ddp": rr.combine_repeats([_run(100.0, losses, [1e6])]), "bytegrad": broken}, None)
    assert set(cell["rows"]) == {"ddp"} and cell["errors"] == {"bytegrad": "repeat 2 of 3: ValueError: boom"}
    failed_line = next(ln for ln in rr.cell_table(cell).splitlines() if ln.startswith("| bytegrad"))
    assert "FAILED: repeat 2 of 3: ValueError: boom" in failed_line
    assert failed_line.count("|") == rr.cell_table(cell).splitlines()[0].count("|")


def test_interleaved_rounds_and_missing_repeats():
    from thinkscale.bench import relax_grid as rg

    assert rg.interleaved_rounds({"ddp": 2, "bytegrad": 2}) == ["ddp", "bytegrad", "ddp", "bytegrad"]
    assert rg.interleaved_rounds({"ddp": 0, "bytegrad": 2, "async": 1}) == ["bytegrad", "async", "bytegrad"]
    assert rg.interleaved_rounds({}) == []
    ok, failed = _run(1.0, [1.0, 0.5], None), {"error": "boom"}
    assert rg.repeats_missing([ok, failed], 3) == 2  # a failed repeat is run again
    assert rg.repeats_missing([ok] * 4, 3) == 0 and rg.repeats_missing([], 1) == 1


def test_resume_keeps_successful_repeats():
    from thinkscale.bench import relax_grid as rg

    losses = [3.0, 2.0, 1.0, 0.5]
    new = {"runs": {}}
    for ms in (100.0, None, 120.0):
        rg.record_repeat(new, "ddp", _run(ms, losses, [1e6]) if ms else {"error": "timed out"})
    rg.record_repeat(new, "async", {"error": "timed out"})
    assert new["runs"]["ddp"]["failed_repeat"] == 2 and len(new["repeat_runs"]["ddp"]) == 3
    old = {"runs": {"ddp": _run(90.0, losses, [1e6]), "bytegrad": {"error": "boom"}}}  # saved before repeats
    report = {"cells": {"new": new, "old": old}}
    rg.keep_successful_repeats(report)
    assert [r["mean_step_ms"] for r in new["repeat_runs"]["ddp"]] == [100.0, 120.0] and "async" not in new["runs"]
    assert new["runs"]["ddp"]["repeat_index"] == 0 and "error" not in new["runs"]["ddp"]
    assert list(old["repeat_runs"]) == ["ddp"] and old["runs"]["ddp"]["repeats"][0]["mean_step_ms"] == 90.0
    args = argparse.Namespace(workloads=["mlp"], contenders=["ddp", "bytegrad"], repeats=3)
    order = rg.run_order({"cells": {rg.cell_key(2, None, 0.0, "mlp"): new}}, args, 2, Link(None, 0.0))
    assert order == {"mlp": ["ddp", "bytegrad", "bytegrad", "bytegrad"]}


def test_repeats_must_be_positive():
    from thinkscale.bench import relax_grid as rg

    parser = argparse.ArgumentParser()
    rg.add_arguments(parser)
    assert parser.parse_args([]).repeats == 3
    rg.validate(parser.parse_args(["--repeats", "1"]))
    with pytest.raises(ValueError, match="^--repeats must be at least 1, got 0$"):
        rg.validate(parser.parse_args(["--repeats", "0"]))
