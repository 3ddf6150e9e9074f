import math

import numpy as np
import pytest
import torch

from vitq_onnx.calibration.quantizers import log2 as L
from vitq_onnx.calibration.quantizers import log2_table as T
from vitq_onnx.calibration.quantizers import sulq as S
from vitq_onnx.calibration.quantizers import uniform as U
from vitq_onnx.calibration.quantizers import weights as W
from vitq_onnx.codes import log2_table as CT
from vitq_onnx.codes import sulq as CS
from vitq_onnx.codes.weights import weight_codes
from vitq_onnx.errors import VitqError
from vitq_onnx.passes.deploy import deploy_passes
from vitq_onnx.recipe import ActQuant


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_grid_and_error_bound(bits):
    x = torch.randn(10000) * 3 + 1
    scale, zp = U.fit_uniform(x, bits)
    codes = torch.round(x / scale) + zp
    y = U.fake_uniform(x, scale, zp, bits)
    levels = torch.unique(torch.round(y / scale + zp))
    assert levels.min() >= 0 and levels.max() <= 2**bits - 1
    inside = (codes >= 0) & (codes <= 2**bits - 1)
    assert ((y - x).abs()[inside] <= scale / 2 + 1e-6).all()


def test_mse_search_beats_min_max_at_low_bits():
    x = torch.distributions.Laplace(0.0, 1.0).sample((50000,))  # heavy tails, like post-GELU
    scale, zp = U.fit_uniform(x, 4)
    mm_scale, mm_zp = U.uniform_params(x.min(), x.max(), 4)
    mse = lambda s, z: ((U.fake_uniform(x, s, z, 4) - x) ** 2).mean()
    assert mse(scale, zp) < 0.5 * mse(mm_scale, mm_zp)


def test_per_channel_ranges_follow_each_channel():
    x = torch.randn(4096, 8) * torch.tensor([0.1, 1, 10, 100, 0.1, 1, 10, 100])
    scale, _ = U.fit_uniform_per_channel(U.channel_stats(x), 4)
    assert scale.shape == (8,)
    assert (scale[3] / scale[0]) > 300


def test_channel_stats_keep_the_ranges_of_rows_they_do_not_sample():
    x = torch.randn(2, 5000, 4)
    x[1, 4321, 2] = 50.0  # one outlier row, likely outside the 2048-row sample
    lo, hi, rows = U.channel_stats(x, max_rows=64)
    assert rows.shape == (64, 4)
    assert hi[2] == 50.0 and torch.equal(lo, x.reshape(-1, 4).min(0).values)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_weight_codes_symmetric_range_and_numpy_twin(bits):
    w = torch.randn(16, 32)
    scale = W.fit_weight(w, bits)
    codes = W.weight_codes(w, scale, bits)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    # the ONNX pass quantizes the transposed [in, out] initializer along axis 1: same integers
    np_codes = weight_codes(w.numpy().T, scale.numpy(), bits, axis=1)
    np.testing.assert_array_equal(np_codes.T, codes.numpy().astype(np.int8))


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_log2_shift_rebuild_equals_log_sqrt2_values(bits):
    scale = torch.tensor(0.9)
    zero = L.log2_zero_code(bits)
    codes = torch.arange(zero + 1, dtype=torch.float32)
    values = L.log2_dequant(codes, scale, bits)
    expected = [float(scale) * 2 ** (-q / 2) for q in range(zero)] + [0.0]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-6)


def test_log2_codes_round_in_the_log_domain():
    scale = torch.tensor(1.0)
    x = torch.tensor([1.0, 2 ** -0.5, 0.5, 2 ** -7, 1e-9, 0.0])
    assert L.log2_codes(x, scale, 4).tolist() == [0, 1, 2, 14, 15, 15]
    assert L.fake_log2(torch.tensor([1.0]), scale, 4).item() == pytest.approx(1.0)
    assert L.fake_log2(torch.tensor([math.sqrt(2) / 4]), scale, 4).item() == pytest.approx(math.sqrt(2) / 4)



def _softmax_like(n=4, tokens=64):
    return torch.softmax(torch.randn(n, 3, tokens, tokens) * 4, dim=-1)


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("j", [0, 3, 7, 10, 15])
def test_sulq_has_2_to_the_b_codes_and_levels_eta_times_2i_minus_1(bits, j):
    x = _softmax_like()
    p = S.sulq_fit_params(x, 2.0**-j, bits)
    codes = S.sulq_codes_of_log(torch.log(x + p["eta"]), p["lo"], p["delta"], bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1 and codes.max() == 2**bits - 1  # honest b bits
    values = S.sulq_dequant(torch.arange(2**bits), p["eta"], p["lo"], p["delta"], bits)
    units = values.double() / 2.0**-j + 1  # 2^i
    assert torch.equal(units, torch.exp2(torch.round(torch.log2(units))))  # every level eta * (2^i - 1)
    assert values.min() == 0.0  # code 0 is exactly zero
    # the uint8 parts of the graph rebuild 2^i exactly, at most 2^7 each
    shifts = CS.sulq_part_shifts(p["lo"], p["delta"], p["eta"], bits)
    parts = [torch.bitwise_right_shift(torch.tensor(128), torch.from_numpy(s)) for s in shifts]
    assert all(int(q.max()) <= 128 for q in parts) and len(parts) == (2 if units.max() > 128 else 1)
    assert torch.equal(sum(q.double() * 256.0**i for i, q in enumerate(parts)), units)


def test_sulq_shift_covers_the_small_probabilities_log2_clamps():
    """The paper's motivating case: at 3 bits a plain log2 quantizer maps every probability below
    2^-7 to its last code; SULQ's shifted grid spends its codes where the probabilities are."""
    x = _softmax_like()
    best = S.fit_sulq(x, 3, None, S.SULQ().etas)
    small = (x > 2**-12) & (x < 2**-5)
    err_sulq = (S.SULQ().fake(x, best, 3) - x)[small].abs().mean()
    err_log2 = (L.fake_log2(x, L.fit_log2(x, 3), 3) - x)[small].abs().mean()
    assert err_sulq < 0.5 * err_log2


def test_sulq_straight_through_forward_matches_the_deployed_values():
    x = _softmax_like()
    kind, p = S.SULQ(), S.sulq_fit_params(x, 2.0**-6, 4)
    xg = x.clone().requires_grad_()
    y = kind.fake_ste(xg, p, 4)
    y.sum().backward()
    assert (y.detach() == kind.fake(x, p, 4)).float().mean() > 0.999  # log vs log2 may split a tie
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [5, 6, 7])
@pytest.mark.parametrize("m", CT.PER_OCTAVE)
def test_log2_table_levels_are_log_spaced_integers_far_from_rounding_ties(bits, m):
    levels = T.table_levels(bits, m)
    assert torch.equal(levels, torch.from_numpy(CT.table_levels(bits, m)))  # calibration's are the codes' tables
    assert len(levels) == 2**bits and 0.99 * 2**CT.GRID_BITS < levels[0] <= 2**CT.GRID_BITS
    assert (levels[:-1] >= levels[1:]).all() and (levels[-1] == 0) == (m in CT.spacings(bits))
    assert CT.spacings(bits) != CT.PER_OCTAVE or bits == 7  # 5-6 bits: the finest spacing cannot reach 0
    big = levels[1:] >= 1024  # where rounding to integers moves a level by under 0.05 %
    ratios = levels[1:].double() / levels[:-1].double()
    np.testing.assert_allclose(ratios[big].numpy(), 2.0 ** (-1 / m), rtol=1e-3)
    # an Exp a few ulps off (another CPU's kernel) rounds every level alike
    args = CT.level_arguments(bits, m, CT.level_offset(bits, m))
    exact = np.exp(args.astype(np.float64))
    for ulps in (-8, 8):
        off = np.float32(exact) + ulps * np.spacing(np.float32(exact))
        np.testing.assert_array_equal(np.round(off.astype(np.float64)).astype(np.int64), levels.numpy())
    high, low = CT.table_digits(bits, m)
    assert high.max() <= 128 and low.max() <= 128 and np.array_equal(high * 128 + low, levels.numpy())


def test_log2_table_beats_log2_where_log2_keeps_16_levels():
    """At 6 bits log2's shifts keep 16 levels; the table spends all 64 on the attention output."""
    gen = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(4, 3, 64, 64, generator=gen) * 3, dim=-1)
    v = torch.randn(4, 3, 64, 16, generator=gen)
    ref = x @ v
    p = T.fit_table(x, 6, v)
    err_table = ((T.fake_table(x, p["scale"], 6, int(p["per_octave"])) @ v - ref) ** 2).mean()
    err_log2 = ((L.fake_log2(x, L.fit_log2(x, 6, v), 6) @ v - ref) ** 2).mean()
    assert err_table < 0.5 * err_log2


def test_free_eta_is_refused_at_deployment():
    assert CS.eta_shift(0.125) == 3 and CS.eta_shift(0.03) is None and CS.eta_shift(2.0**-16) is None
    with pytest.raises(VitqError, match="not 2\\^-j"):
        CS.sulq_part_shifts(-5.0, 0.7, 0.03, 3)
    params = {k: np.float32(v) for k, v in (("eta", 0.03), ("lo", -5.0), ("delta", 0.7))}
    with pytest.raises(VitqError, match="simulation only"):
        deploy_passes({"a/MatMul:0": ActQuant("sulq-free", 3, params)})
