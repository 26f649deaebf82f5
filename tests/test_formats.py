"""FP4 / FP8 / UE8M0 codecs against hand-written bytes, and the reference QAT ops on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from dsv4cli.formats import official as formats
from dsv4cli.kernels import ref


def e8m0(*exponent_bytes: int) -> torch.Tensor:
    return torch.tensor(exponent_bytes, dtype=torch.uint8).view(torch.float8_e8m0fnu)


# ------------------------------------------------------------------------- UE8M0


def test_ue8m0_decodes_as_power_of_two_of_byte_minus_127():
    assert formats.ue8m0_to_float(e8m0(127, 128, 126, 0, 254)).tolist() == [1.0, 2.0, 0.5, 2.0**-127, 2.0**127]


def test_ue8m0_encode_is_exact_and_rejects_out_of_range():
    scales = torch.tensor([1.0, 2.0, 0.5, 2.0**-20, 2.0**30])
    assert formats.scale_to_ue8m0(scales).view(torch.uint8).tolist() == [127, 128, 126, 107, 157]
    with pytest.raises(ValueError):
        formats.scale_to_ue8m0(torch.tensor([2.0**128]))


def test_pow2_scale_rounds_up_to_fit_max_code():
    amax = torch.tensor([448.0, 449.0, 896.0, 1.0])
    assert formats.pow2_scale(amax, 448.0).tolist() == [1.0, 2.0, 2.0, 2.0**-8]


# ---------------------------------------------------------------------------- FP4


def test_fp4_nibble_order_low_nibble_is_even_element():
    # codes: 0.5 -> 1, -1.0 -> 0b1010, 6.0 -> 7, 0 -> 0
    packed = formats.pack_fp4(formats.fp4_codes(torch.tensor([[0.5, -1.0, 6.0, 0.0]])))
    assert packed.view(torch.uint8).tolist() == [[0xA1, 0x07]]
    assert formats.unpack_fp4(torch.tensor([[0xA1, 0x07]], dtype=torch.uint8).view(torch.int8)).tolist() == [
        [1, 10, 7, 0]
    ]


def test_fp4_code_table():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = formats.pack_fp4(codes[None])
    values = formats.dequantize_fp4_rows(
        torch.cat([packed, torch.zeros(1, 8, dtype=torch.int8)], 1), e8m0(127)[None]
    )[0, :16]
    expected = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert values.tolist() == expected


def test_fp4_dequantize_hand_written_bytes_with_scale():
    # one row of 32 inputs: bytes 0xA1 0x07 then zeros; scale byte 128 = 2.0
    packed = torch.zeros(1, 16, dtype=torch.uint8)
    packed[0, 0], packed[0, 1] = 0xA1, 0x07
    values = formats.dequantize_fp4_rows(packed.view(torch.int8), e8m0(128)[None])
    assert values[0, :4].tolist() == [1.0, -2.0, 12.0, 0.0]
    assert values[0, 4:].abs().sum() == 0


def test_fp4_rounding_ties_go_to_even_code_and_saturate():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -5.0, 0.26, 4.9])
    decoded = formats.FP4_VALUES[formats.fp4_codes(x).long()]
    assert decoded.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -4.0, 0.5, 4.0]


def test_fp4_quantize_round_trip_is_exact_on_representable_values():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 64))
    scales = 2.0 ** torch.randint(-10, 5, (8, 2)).float()
    weight = formats.FP4_VALUES[codes] * scales.repeat_interleave(32, 1)
    # force each block to contain its max magnitude so the chosen scale is the one used above
    weight[:, 0] = 6 * scales[:, 0]
    weight[:, 32] = 6 * scales[:, 1]
    packed, scale = formats.quantize_fp4_rows(weight)
    assert packed.shape == (8, 32) and packed.dtype == torch.int8
    assert scale.shape == (8, 2) and scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(formats.dequantize_fp4_rows(packed, scale), weight)


def test_fp4_quantize_error_is_bounded():
    torch.manual_seed(1)
    weight = torch.randn(16, 128)
    packed, scale = formats.quantize_fp4_rows(weight)
    err = (formats.dequantize_fp4_rows(packed, scale) - weight).abs()
    # the coarsest step of e2m1 is 2 (between 4 and 6): at most half a step times the scale
    step = formats.ue8m0_to_float(scale).repeat_interleave(32, 1)
    assert (err <= step + 1e-6).all()


# ---------------------------------------------------------------------------- FP8


def test_fp8_e4m3_bytes():
    values = torch.tensor([1.0, 448.0, -2.0, 0.0]).to(torch.float8_e4m3fn)
    assert values.view(torch.uint8).tolist() == [0x38, 0x7E, 0xC0, 0x00]


def test_fp8_block_quantization_scale_per_128x128_tile():
    weight = torch.full((130, 256), 3.0)
    weight[5, 200] = 896.0  # tile (0, 1): amax 896 -> scale 2
    weight[128:] = 0.25  # tile (1, 1): amax 0.25 -> scale 2**-10
    weight[129, 0] = -0.5  # tile (1, 0): amax 0.5 -> scale 2**-9
    q, scale = formats.quantize_fp8_blocks(weight)
    assert scale.shape == (2, 2)
    assert scale.view(torch.uint8).tolist() == [[127 - 7, 128], [127 - 9, 127 - 10]]
    assert q[5, 200].float().item() == 448.0
    assert formats.dequantize_fp8_blocks(q, scale)[5, 200].item() == 896.0
    assert torch.equal(formats.dequantize_fp8_blocks(q, scale), weight)


def test_fp8_round_trip_error_is_bounded():
    torch.manual_seed(2)
    weight = torch.randn(256, 384)
    q, scale = formats.quantize_fp8_blocks(weight)
    back = formats.dequantize_fp8_blocks(q, scale)
    assert ((back - weight).abs() <= weight.abs() * 2**-4 + 1e-3).all()


# --------------------------------------------------------------- activation QAT


def test_fake_quant_fp8_hand_computed():
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1], x[0, 2] = 1000.0, 1.0, 250.0
    # amax 1000 -> scale 2**ceil(log2(1000/448)) = 4: 1000/4 = 250 -> e4m3 256 -> 1024
    out = formats.fake_quant_fp8(x, 128)
    assert out[0, :3].tolist() == [1024.0, 1.0, 256.0]


def test_fake_quant_fp8_blocks_are_independent_and_zero_safe():
    x = torch.zeros(2, 256)
    x[0, 130] = 3.3
    out = formats.fake_quant_fp8(x, 128)
    assert out[1].abs().sum() == 0
    assert out[0, 130].item() == pytest.approx(3.25)  # scale 2**-7: 3.3 -> 422.4 -> e4m3 416 -> 3.25


def test_fake_quant_fp4_hand_computed():
    x = torch.tensor([[0.17678, -0.06, 0.0, 0.1] + [0.0] * 28])
    # amax 0.17678 -> scale 2**ceil(log2(0.17678/6)) = 2**-5; x/scale = 5.66 -> 6, -1.92 -> -2, 3.2 -> 3
    assert formats.fake_quant_fp4(x)[0, :4].tolist() == [0.1875, -0.0625, 0.0, 0.09375]


def test_hadamard_is_orthonormal_sylvester():
    h4 = formats.hadamard_matrix(4)
    expected = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2
    assert torch.equal(h4, expected)
    h = formats.hadamard_matrix(128)
    assert torch.allclose(h @ h.T, torch.eye(128), atol=1e-6)
    with pytest.raises(ValueError):
        formats.hadamard_matrix(96)


def test_indexer_fp4_quant_hand_computed():
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    # Hadamard of e0 = 1/sqrt(32) = 0.1768 everywhere; FP4 with scale 2**-5 -> 6 * 2**-5 = 0.1875
    assert torch.equal(ref.indexer_fp4_quant(x), torch.full((1, 32), 0.1875))


def test_kv_fp8_quant_leaves_rope_dims_untouched():
    torch.manual_seed(3)
    kv = torch.randn(2, 5, 128)
    out = ref.kv_fp8_quant(kv, rope_head_dim=64)
    assert torch.equal(out[..., 64:], kv[..., 64:])
    assert torch.equal(out[..., :64], formats.fake_quant_fp8(kv[..., :64], 64))
    assert not torch.equal(out[..., :64], kv[..., :64])


def test_reference_linear_fp8_with_act_quant_hand_computed():
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = 1000.0, 1.0
    w, s = formats.quantize_fp8_blocks(torch.eye(128)[:2] * 0.5)
    y = ref.linear(x, w, s, act_quant=True)
    assert y.tolist() == [[512.0, 0.5]]
    assert ref.linear(x, w, s, act_quant=False).tolist() == [[500.0, 0.5]]


def test_reference_linear_fp4_matches_dequantized_matmul():
    torch.manual_seed(4)
    w, s = formats.quantize_fp4_rows(torch.randn(48, 256))
    x = torch.randn(3, 256)
    expected = x @ formats.dequantize_fp4_rows(w, s).T
    assert torch.allclose(ref.linear(x, w, s), expected, atol=1e-5)
