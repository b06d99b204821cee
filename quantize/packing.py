"""Pack small unsigned integer codes into int32 words, and back.

Codes are packed along the last dimension as one little-endian bit stream: code i occupies
bits [bits*i, bits*(i+1)) of the stream, and word w holds stream bits [32*w, 32*(w+1)).
For 4 bits that is eight codes per word, code 0 in the lowest nibble:

    word 0:  | c7 | c6 | c5 | c4 | c3 | c2 | c1 | c0 |   (bit 31 ... bit 0)

For 3 bits a code may straddle two words (code 10 uses bits 30-31 of word 0 and bit 0 of
word 1); 32 codes fill exactly 3 words. A row of n codes takes ceil(n*bits/32) words.
"""

from __future__ import annotations

import torch

CODES_PER_CHUNK = 32  # 32 codes of b bits fill exactly b words, whatever b is


PACK_ROWS = 2048


def packed_width(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dimension into int32 words (a few
    thousand rows at a time: the work buffers hold 64-bit integers)."""
    if codes.dim() > 1 and codes.shape[0] > PACK_ROWS:
        return torch.cat([pack(rows, bits) for rows in codes.split(PACK_ROWS)])
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    n_chunks = -(-n // CODES_PER_CHUNK)
    chunks = torch.zeros(*lead, n_chunks * CODES_PER_CHUNK, dtype=torch.int64, device=codes.device)
    chunks[..., :n] = codes.to(torch.int64)
    # code position within a chunk first, so each step below reads and writes contiguous memory
    chunks = chunks.view(*lead, n_chunks, CODES_PER_CHUNK).movedim(-1, 0).contiguous()
    words = torch.zeros(bits, *lead, n_chunks, dtype=torch.int64, device=codes.device)
    for j in range(CODES_PER_CHUNK):
        word, shift = divmod(j * bits, 32)
        words[word] |= (chunks[j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[word + 1] |= chunks[j] >> (32 - shift)
    words = words.movedim(0, -1).reshape(*lead, n_chunks * bits)[..., : packed_width(n, bits)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first n codes of each row, as int32."""
    lead = packed.shape[:-1]
    n_chunks = -(-n // CODES_PER_CHUNK)
    words = torch.zeros(*lead, n_chunks * bits, dtype=torch.int64, device=packed.device)
    words[..., : packed.shape[-1]] = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(*lead, n_chunks, bits).movedim(-1, 0).contiguous()
    mask = (1 << bits) - 1
    codes = torch.empty(CODES_PER_CHUNK, *lead, n_chunks, dtype=torch.int64, device=packed.device)
    for j in range(CODES_PER_CHUNK):
        word, shift = divmod(j * bits, 32)
        code = words[word] >> shift
        if shift + bits > 32:
            code = code | (words[word + 1] << (32 - shift))
        codes[j] = code & mask
    return codes.movedim(0, -1).reshape(*lead, n_chunks * CODES_PER_CHUNK)[..., :n].to(torch.int32)
