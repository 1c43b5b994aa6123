"""MinMaxUInt8 against the spec formula, and ByteGrad against a one-process reference of its 5 steps."""
import pytest
import torch

from distributed_harness import run_ranks
from relax_models import rank_batch, small_mlp
from thinkscale.relax import DataParallel, quantize
from thinkscale.relax.algorithms.bytegrad import ByteGrad, ByteGradExchange, piece_ranges


def _spec_compress(chunk: torch.Tensor):
    """The spec, written out scalar by scalar for one chunk."""
    lo, hi = chunk.min().item(), chunk.max().item()
    scale = torch.tensor(255.0) / (torch.tensor(hi) - torch.tensor(lo) + 1e-7)
    upper = torch.round(torch.tensor(hi) * scale)
    lower = upper - 255
    return [int(min(torch.round(v * scale), upper) - lower) for v in chunk], scale, lower


def test_compress_matches_spec_formula_element_by_element():
    torch.manual_seed(0)
    t = torch.randn(3 * 40) * 3 + 1
    minmax, q = quantize.compress(t, chunks=3)
    assert q.dtype == torch.uint8 and q.shape == (3, 40)
    for c in range(3):
        chunk = t[c * 40:(c + 1) * 40]
        expected, scale, lower = _spec_compress(chunk)
        assert q[c].tolist() == expected
        assert minmax[c].tolist() == [chunk.min().item(), chunk.max().item()]
        restored = (q[c].float() + lower) / scale
        assert torch.equal(quantize.decompress(minmax, q)[c], restored)


def test_round_half_to_even():
    # min 0, max 255: 255 + 1e-7 rounds to 255 in float32, so scale = 1 and 0.5, 2.5 are exact ties.
    t = torch.tensor([0.0, 0.5, 1.5, 2.5, 255.0])
    _, q = quantize.compress(t)
    assert q[0, :4].tolist() == [0, 0, 2, 2]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_error_bound(scale):
    torch.manual_seed(1)
    t = torch.randn(4096) * scale
    minmax, q = quantize.compress(t, chunks=4)
    err = (quantize.decompress(minmax, q).reshape(-1) - t).abs().reshape(4, -1)
    bound = (minmax[:, 1] - minmax[:, 0]) / 510 + 1e-6
    assert (err.amax(dim=1) <= bound * (1 + 1e-5)).all()


def test_constant_chunk_is_exact():
    t = torch.full((16,), 2.0)
    minmax, q = quantize.compress(t)
    assert torch.equal(quantize.decompress(minmax, q).reshape(-1), t)


def test_compiled_and_eager_give_identical_bytes(monkeypatch):
    monkeypatch.setattr(quantize, "COMPILE_MIN_NUMEL", 0)
    torch.manual_seed(2)
    t = torch.randn(8 * 1024)
    minmax, q = quantize.compress(t, chunks=8)
    ref_minmax, ref_q = quantize.compress_eager(t, chunks=8)
    assert torch.equal(q, ref_q) and torch.equal(minmax, ref_minmax)
    assert torch.equal(quantize.decompress(minmax, q), quantize.decompress_eager(ref_minmax, ref_q))


def test_bad_input():
    with pytest.raises(ValueError, match="equal chunks"):
        quantize.compress(torch.zeros(10), chunks=3)
    with pytest.raises(TypeError, match="floating"):
        quantize.compress(torch.zeros(4, dtype=torch.int32))


def reference_bytegrad(per_rank: list[torch.Tensor], block: int = 1024, piece_numel: int = 1 << 20) -> torch.Tensor:
    """The scheme in one process, with the chunk quantizer (one chunk = one block): what every rank must
    end with. Per piece, rank r reduces chunk r: decode every rank's codes, sum in rank order, / n."""
    n, numel = len(per_rank), per_rank[0].numel()
    out = torch.empty(numel)
    for start, length in piece_ranges(numel, n, block, piece_numel):
        size = length // n
        for r in range(n):
            lo = start + r * size
            decoded = [quantize.decompress_eager(*quantize.compress_eager(t[lo:lo + size], chunks=size // block))
                       for t in per_rank]
            total = decoded[0]
            for d in decoded[1:]:
                total = total + d
            mm, q = quantize.compress_eager((total / n).reshape(-1), chunks=size // block)
            out[lo:lo + size] = quantize.decompress_eager(mm, q).reshape(-1)
    return out


def _bytegrad_grads(rank, world, options):
    module = small_mlp(seed=0)
    model = DataParallel(module, None, algorithm="bytegrad", hierarchical=False, bucket_size_mb=1, **options)
    x, y = rank_batch(rank, 0)
    with model.no_sync():  # local grads only
        torch.nn.functional.mse_loss(model(x), y).backward()
    # each bucket's local gradient in its layout, zero padding included
    local = [torch.cat([p.grad.reshape(-1) for p in b.params]
                       + [torch.zeros(b.flat.numel() - b.numel)]) for b in model.buckets]
    for p in module.parameters():
        p.grad = None
    torch.nn.functional.mse_loss(model(x), y).backward()
    return local, [b.flat.clone() for b in model.buckets], [b.numel for b in model.buckets], \
        [b.kind for b in model.buckets]


@pytest.mark.parametrize("world", [2, 3])
def test_bytegrad_equals_reference_and_ranks_bit_identical(world):
    options = {"block_size": 16, "full_precision_1d": False}
    results = run_ranks(_bytegrad_grads, world, args=(options,))
    n_buckets = len(results[0][0])
    for b in range(n_buckets):
        expected = reference_bytegrad([local[b] for local, *_ in results], block=16)
        for _, averaged, numel, _ in results:
            assert torch.equal(averaged[b][:numel[b]], expected[:numel[b]])
    assert all(torch.equal(results[0][1][b], r[1][b]) for r in results for b in range(n_buckets))


def test_bytegrad_keeps_1d_parameters_in_full_precision():
    results = run_ranks(_bytegrad_grads, 2, args=({"block_size": 16},))
    kinds = results[0][3]
    assert "full precision" in kinds and "" in kinds  # biases apart from the weight matrices
    for b, kind in enumerate(kinds):
        locals_b = [local[b] for local, *_ in results]
        expected = (locals_b[0] + locals_b[1]) / 2 if kind else reference_bytegrad(locals_b, block=16)
        numel = results[0][2][b]
        for _, averaged, *_ in results:
            assert torch.equal(averaged[b][:numel], expected[:numel]), kind


def test_piece_ranges_cover_the_buffer_in_whole_units():
    assert piece_ranges(48, 2, 4, 20) == [(0, 16), (16, 16), (32, 16)]  # 20 rounds down to 16 = 2 units
    assert piece_ranges(40, 2, 4, 16) == [(0, 16), (16, 16), (32, 8)]
    assert piece_ranges(8, 2, 4, 1) == [(0, 8)]  # never below one unit
    with pytest.raises(ValueError, match="multiple of 2 ranks x 4"):
        piece_ranges(10, 2, 4, 16)


def _exchange_average(rank, world, numel, block, piece_mb, steps, options):
    from thinkscale.relax.comm import Comm
    import torch.distributed as dist
    comm = Comm(dist.group.WORLD)
    exchange = ByteGradExchange(block, piece_mb, **options)
    inputs, outputs = [], []
    for step in range(steps):
        t = torch.randn(numel, generator=torch.Generator().manual_seed(100 * rank + step))
        inputs.append(t.clone())
        exchange.average_(t, comm)
        outputs.append(t)
    return inputs, outputs, exchange.state_dict(), quantize.compiled_status()


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_pipelined_pieces_equal_reference(world):
    """Several pieces in flight (piece 1 KiB = 256 elements, 12 pieces)."""
    numel = 256 * 12
    results = run_ranks(_exchange_average, world, args=(numel, 16, 1 / 1024, 1, {}))
    expected = reference_bytegrad([r[0][0] for r in results], block=16, piece_numel=256 // (16 * world) * 16 * world)
    for _, outputs, *_ in results:
        assert torch.equal(outputs[0], expected)


def test_exchange_compiled_path_equals_reference():
    """Big enough for the compiled kernels (>= 1 << 20 elements per piece): same bytes as eager."""
    numel = 1 << 21
    results = run_ranks(_exchange_average, 2, args=(numel, 1024, 8.0, 1, {}), timeout=600)
    expected = reference_bytegrad([r[0][0] for r in results], block=1024, piece_numel=1 << 21)
    assert torch.equal(results[0][1][0], expected) and torch.equal(results[1][1][0], expected)
    kernels = results[0][3]
    if quantize._COMPILE_ENABLED:  # no silent fallback to eager: the compiled kernels ran
        assert {kernels[k] for k in ("quantize_blocks", "reduce_requantize", "decode_blocks")} == {"compiled"}


def test_error_feedback_residual_is_what_quantization_dropped():
    """After one step the sender's residual is exactly x - decode(encode(x)); the mean of many steps of a
    constant input converges to the true mean with error feedback (it is biased without)."""
    numel, block = 512, 64
    results = run_ranks(_exchange_average, 2, args=(numel, block, 1.0, 1, {"error_feedback": True}))
    for inputs, _, state, _ in results:
        x = inputs[0]
        expected = x - quantize.decompress_eager(*quantize.compress_eager(x, chunks=numel // block)).reshape(-1)
        assert torch.equal(state["residual_sent"], expected)
        assert state["residual_owned"].shape == (numel // 2,)


def _constant_average(rank, world, error_feedback, stochastic_rounding, steps):
    from thinkscale.relax.comm import Comm
    import torch.distributed as dist
    comm = Comm(dist.group.WORLD)
    exchange = ByteGradExchange(64, 1.0, error_feedback=error_feedback, stochastic_rounding=stochastic_rounding,
                                salt=rank)
    x = torch.randn(256, generator=torch.Generator().manual_seed(rank))
    total = torch.zeros(256)
    for _ in range(steps):
        t = x.clone()
        exchange.average_(t, comm)
        total += t
    return x, total / steps


@pytest.mark.parametrize("error_feedback,stochastic", [(True, False), (False, True)])
def test_error_feedback_and_stochastic_rounding_remove_the_bias(error_feedback, stochastic):
    steps = 64
    plain = run_ranks(_constant_average, 2, args=(False, False, steps))
    better = run_ranks(_constant_average, 2, args=(error_feedback, stochastic, steps))
    truth = (plain[0][0] + plain[1][0]) / 2
    plain_error = (plain[0][1] - truth).abs().mean().item()
    better_error = (better[0][1] - truth).abs().mean().item()
    assert better_error < plain_error / 3, (plain_error, better_error)
    assert torch.equal(better[0][1], better[1][1])  # still bit-identical across ranks


def test_stochastic_rounding_is_unbiased_and_kernel_equals_eager():
    x = torch.linspace(-1, 1, 4096).reshape(4, 1024)
    minmax, codes = torch.empty(4, 2), torch.empty(4, 1024, dtype=torch.uint8)
    decoded = torch.zeros(4, 1024)
    trials = 200
    for salt in range(trials):
        quantize.quantize_blocks_(x, minmax, codes, salt=torch.tensor(salt))
        out = torch.empty(4, 1024)
        quantize.decode_blocks_(minmax, codes, out)
        decoded += out
    quantize.quantize_blocks_(x, minmax, codes)
    nearest = torch.empty(4, 1024)
    quantize.decode_blocks_(minmax, codes, nearest)
    step = (2 / 4 + 1e-7) / 255  # one code of a block's range
    nearest_bias = (nearest - x).abs().mean().item()  # ~ step / 4
    stochastic_bias = ((decoded / trials) - x).abs().mean().item()  # noise ~ step / (2 sqrt(trials))
    assert nearest_bias > step / 5 and stochastic_bias < step / 15, (nearest_bias, stochastic_bias, step)
    mm_eager, codes_eager = torch.empty(4, 2), torch.empty(4, 1024, dtype=torch.uint8)
    mm_eager.copy_(quantize._quantize_blocks_eager(x, codes_eager, None, torch.tensor(5)))
    quantize.quantize_blocks_(x, minmax, codes, salt=torch.tensor(5))
    assert torch.equal(codes, codes_eager) and torch.equal(minmax, mm_eager)


def test_uniform_hash_is_a_pure_function_in_unit_interval():
    index = torch.arange(1 << 16)
    u = quantize.uniform_hash(index, torch.tensor(3))
    assert torch.equal(u, quantize.uniform_hash(index, torch.tensor(3)))
    assert not torch.equal(u, quantize.uniform_hash(index, torch.tensor(4)))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_block_kernels_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="block shapes disagree"):
        quantize.quantize_blocks_(torch.zeros(4, 8), torch.zeros(4, 2), torch.zeros(4, 16, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [{"block_size": 12}, {"block_size": 0}, {"piece_size_mb": 0}])
def test_bytegrad_rejects_bad_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ByteGrad(**bad)


def _error_feedback_checkpoint(rank, world):
    module = small_mlp(seed=0)
    model = DataParallel(module, None, algorithm="bytegrad", error_feedback=True, block_size=16,
                         bucket_size_mb=1, hierarchical=False)
    x, y = rank_batch(rank, 0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    residuals = [ex.residual_sent.clone() for ex in model._impl.exchanges.values()]
    fresh = DataParallel(small_mlp(seed=1), None, algorithm="bytegrad", error_feedback=True, block_size=16,
                         bucket_size_mb=1, hierarchical=False)
    fresh.load_state_dict(saved)
    loaded = [ex.residual_sent for ex in fresh._impl.exchanges.values()]
    return residuals, loaded


def test_error_feedback_residuals_travel_with_the_state_dict():
    for residuals, loaded in run_ranks(_error_feedback_checkpoint, 2):
        assert residuals and any(r.abs().sum() > 0 for r in residuals)  # quantization dropped something
        assert all(torch.equal(a, b) for a, b in zip(residuals, loaded))
