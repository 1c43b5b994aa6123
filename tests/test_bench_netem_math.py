"""Pure pieces of the network benchmark: rates, tbf bucket, the forwarder's schedule, report math."""
import math

import pytest

from thinkscale.bench import relax_report as rr
from thinkscale.bench.latency_forwarder import destination_index, schedule
from thinkscale.bench.netem import Link, parse_rate, tbf_burst_bytes


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
    # 1 Gbit/s: 2 ms of traffic = 250 000 bytes beats two 1500-byte packets
    assert tbf_burst_bytes(10**9, 1500) == 250_000
    # 1 Mbit/s: 2 ms is 250 bytes, so two full 64000-byte TUN packets (+ headers) decide
    assert tbf_burst_bytes(10**6, 64000) == 2 * 64100


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
