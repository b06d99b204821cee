import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtool.quantize import packing
from qtool.quantize.packing import pack, packed_width, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 5), columns=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_pack_round_trips_every_width_and_odd_shapes(bits, rows, columns, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, columns), generator=generator, dtype=torch.int32)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, packed_width(columns, bits))
    assert torch.equal(unpack(packed, bits, columns), codes)


def test_four_bit_layout_puts_code_zero_in_the_lowest_nibble():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.int32)
    (word,) = pack(codes, 4)[0].tolist()
    assert word & 0xFFFFFFFF == 0xF7654321


def test_three_bit_codes_straddle_words_as_one_bit_stream():
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 10] = 0b111  # stream bits 30, 31 and 32: the top two bits of word 0, bit 0 of word 1
    words = pack(codes, 3)[0].tolist()
    assert len(words) == 3
    assert words[0] & 0xFFFFFFFF == 0xC0000000
    assert words[1] == 1 and words[2] == 0


def test_eight_bit_codes_fill_bytes_little_endian():
    codes = torch.tensor([[0x12, 0x34, 0x56, 0xF8, 0x9A]], dtype=torch.int32)
    words = [w & 0xFFFFFFFF for w in pack(codes, 8)[0].tolist()]
    assert words == [0xF8563412, 0x9A]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_packing_works_along_the_last_dimension_of_any_rank(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 37), dtype=torch.int32)
    assert torch.equal(unpack(pack(codes, bits), bits, 37), codes)


def test_packing_many_rows_in_slices_gives_the_same_words():
    codes = torch.randint(0, 8, (packing.PACK_ROWS * 2 + 5, 70), dtype=torch.int32)
    whole = torch.cat([packing.pack(rows, 3) for rows in codes.split(1000)])
    assert torch.equal(packing.pack(codes, 3), whole)
    assert torch.equal(packing.unpack(whole, 3, 70), codes)
