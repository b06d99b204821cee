"""The kernels' inline PTX run on the CPU through a model of its instructions (`ptx_model`), against
plain arithmetic: the interpreter skips inline assembly, so this is where its text meets a test
before a GPU runs it."""

import numpy as np
import pytest

from qtool.kernels.quant_matmul import (code_slots, half2_dot_ptx, half2_table_dot_ptx, half2_table_weights_ptx,
                                       half2_weights_ptx)

from ptx_model import run  # beside this file (pytest puts its folder on the path)

RNG = np.random.default_rng(0)
FP16_SUMS = 2e-3  # eight products rounded to fp16 and summed in fp16: error against the sum of their sizes


def fp16_bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float16).view(np.uint16).astype(np.int64)


def pair(low, high) -> int:
    """Two fp16 values as one half2 word (low half first)."""
    bits = fp16_bits([low, high])
    return int(bits[0] | bits[1] << 16)


def as_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def word_of(codes, bits: int) -> int:
    """Codes of consecutive inputs in one word, each at its `code_slots` slot."""
    return sum(int(code) << (bits * slot) for code, slot in zip(codes, code_slots(bits)))


def planes(table) -> list[int]:
    """The byte planes `_table_planes` builds: low bytes of entries 4r..4r+3, then high bytes."""
    bits = fp16_bits(table)
    low = [sum(int(bits[4 * r + i] & 0xFF) << (8 * i) for i in range(4)) for r in range(len(table) // 4)]
    high = [sum(int(bits[4 * r + i] >> 8) << (8 * i) for i in range(4)) for r in range(len(table) // 4)]
    return low + high


def table_dot(table, codes, x) -> float:
    operands = {1: word_of(codes, 4), 2: pair(x[0], x[2]), 3: pair(x[1], x[3]), 4: pair(x[4], x[6]),
                5: pair(x[5], x[7])}
    operands.update({6 + i: plane for i, plane in enumerate(planes(table))})
    return as_float(run(half2_table_dot_ptx(len(table)), operands)[0])


@pytest.mark.parametrize("entries", [16, 8])
def test_table_lookups_select_each_codes_entry(entries):
    table = (RNG.standard_normal(entries) * 0.05).astype(np.float16)
    for _ in range(50):
        codes = RNG.integers(0, entries, 8)
        for j in range(8):  # one input at a time: the product is the entry itself
            x = np.zeros(8, dtype=np.float16)
            x[j] = 1.0
            assert table_dot(table, codes, x) == float(table[codes[j]])


@pytest.mark.parametrize("entries", [16, 8])
def test_table_weights_are_each_codes_entry(entries):
    table = (RNG.standard_normal(entries) * 0.05).astype(np.float16)
    for _ in range(50):
        codes = RNG.integers(0, entries, 8)
        operands = {8: word_of(codes, 4), **{9 + i: plane for i, plane in enumerate(planes(table))}}
        out = run(half2_table_weights_ptx(entries), operands)
        assert [out[j] for j in range(8)] == list(fp16_bits(table[codes]))


@pytest.mark.parametrize("entries", [16, 8])
def test_table_dot_sums_every_input(entries):
    table = (RNG.standard_normal(entries) * 0.05).astype(np.float16)
    for _ in range(50):
        codes = RNG.integers(0, entries, 8)
        x = RNG.standard_normal(8).astype(np.float16)
        terms = table[codes].astype(np.float64) * x.astype(np.float64)
        assert abs(table_dot(table, codes, x) - terms.sum()) <= FP16_SUMS * np.abs(terms).sum()


@pytest.mark.parametrize("bits", [4, 8])
def test_half2_dot_gives_the_products_over_256(bits):
    per_word = 32 // bits
    for _ in range(50):
        codes = RNG.integers(0, 2**bits, per_word)
        zero = int(RNG.integers(0, 2**bits))
        x = RNG.standard_normal(per_word).astype(np.float16)
        operands = {1: word_of(codes, bits)}
        operands.update({2 + i: pair(x[2 * i], x[2 * i + 1]) for i in range(per_word // 2)})
        zero_half = int(fp16_bits([4 + zero / 256])[0])
        operands[2 + per_word // 2] = zero_half | zero_half << 16
        odd_half = int(fp16_bits([0.25 + zero / 256])[0])  # the zero of the pairs a nibble up (4 bits)
        operands[3 + per_word // 2] = odd_half | odd_half << 16
        result = as_float(run(half2_dot_ptx(bits), operands)[0])
        terms = (codes - zero) / 256 * x.astype(np.float64)
        assert abs(result - terms.sum()) <= FP16_SUMS * np.abs(terms).sum()


@pytest.mark.parametrize("bits", [4, 8])
def test_half2_weights_round_once(bits):
    for _ in range(50):
        low, high, zero = (int(v) for v in RNG.integers(0, 2**bits, 3))
        scale = np.float16(RNG.random() * 0.02 + 0.001)
        zero_half = int(fp16_bits([1024 + zero])[0])
        scale_half = int(fp16_bits([scale])[0])
        out = run(half2_weights_ptx(bits), {2: low | high << 16, 3: zero_half * 0x10001, 4: scale_half * 0x10001})
        for code, bits16 in ((low, out[0]), (high, out[1])):
            assert bits16 == int(fp16_bits([np.float64(code - zero) * np.float64(scale)])[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_half2_dot_of_two_tokens_gives_each_the_sum_of_one(bits):
    """The weights made once serve both tokens: each sum is bit for bit the one-token dot's."""
    per_word, pairs = 32 // bits, 16 // bits
    for _ in range(50):
        word = word_of(RNG.integers(0, 2**bits, per_word), bits)
        zero = int(RNG.integers(0, 2**bits))
        zeros = [int(fp16_bits([offset + zero / 256])[0]) * 0x10001 for offset in (4, 0.25)]
        tokens = [[pair(*RNG.standard_normal(2).astype(np.float16)) for _ in range(pairs)] for _ in range(2)]
        one = [run(half2_dot_ptx(bits), {1: word, **{2 + i: x for i, x in enumerate(inputs)},
                                         2 + pairs: zeros[0], 3 + pairs: zeros[1]})[0] for inputs in tokens]
        operands = {2: word, **{3 + i: x for i, x in enumerate(tokens[0] + tokens[1])}}
        operands.update({3 + 2 * pairs: zeros[0], 4 + 2 * pairs: zeros[1]})
        two = run(half2_dot_ptx(bits, tokens=2), operands)
        assert [two[0], two[1]] == one
