"""MinMaxUInt8 against the spec formula, and ByteGrad against a one-process reference of its 5 steps."""
import pytest
import torch

from distributed_harness import run_ranks
from relax_models import rank_batch, small_mlp
from thinkscale.relax import DataParallel, quantize


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


def reference_bytegrad(per_rank: list[torch.Tensor]) -> torch.Tensor:
    """The 5-step scheme in one process: what every rank must end with."""
    n = len(per_rank)
    compressed = [quantize.compress_eager(t, chunks=n) for t in per_rank]
    result = []
    for r in range(n):  # rank r reduces chunk r
        chunk_r = torch.stack([quantize.decompress_eager(mm[r:r + 1], q[r:r + 1])[0] for mm, q in compressed])
        mm, q = quantize.compress_eager(chunk_r.mean(dim=0))
        result.append(quantize.decompress_eager(mm, q)[0])
    return torch.cat(result)


def _bytegrad_grads(rank, world):
    module = small_mlp(seed=0)
    model = DataParallel(module, None, algorithm="bytegrad", hierarchical=False, bucket_size_mb=1)
    x, y = rank_batch(rank, 0)
    with model.no_sync():  # local grads only
        torch.nn.functional.mse_loss(model(x), y).backward()
    # each bucket's local gradient in its layout, zero padding included
    local = [torch.cat([p.grad.reshape(-1) for p in b.params]
                       + [torch.zeros(b.flat.numel() - b.numel)]) for b in model.buckets]
    for p in module.parameters():
        p.grad = None
    torch.nn.functional.mse_loss(model(x), y).backward()
    return local, [b.flat.clone() for b in model.buckets], [b.numel for b in model.buckets]


@pytest.mark.parametrize("world", [2, 3])
def test_bytegrad_equals_reference_and_ranks_bit_identical(world):
    results = run_ranks(_bytegrad_grads, world)
    n_buckets = len(results[0][0])
    for b in range(n_buckets):
        expected = reference_bytegrad([local[b] for local, _, _ in results])
        for _, averaged, numel in results:
            assert torch.equal(averaged[b][:numel[b]], expected[:numel[b]])
    assert all(torch.equal(results[0][1][b], r[1][b]) for r in results for b in range(n_buckets))
