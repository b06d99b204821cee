"""A model of the few PTX instructions qtool's inline assembly uses, to run that assembly on a CPU:
the interpreter (TRITON_INTERPRET=1) skips inline PTX, so without this its text would be checked
only on a GPU. Registers hold unsigned integers (32 or 16 bits); f16 arithmetic rounds through
numpy's float16 (fma rounds once: the float64 product of two fp16 values is exact)."""

import re

import numpy as np


def _f16(bits: int) -> np.float16:
    return np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0]


def _bits16(value) -> int:
    return int(np.array([value], dtype=np.float16).view(np.uint16)[0])


def _halves(word: int) -> tuple[np.float16, np.float16]:
    return _f16(word), _f16(word >> 16)


def _join(low, high) -> int:
    return _bits16(low) | _bits16(high) << 16


def prmt(a: int, b: int, selector: int) -> int:
    """Default-mode PRMT: byte k of the result is byte (nibble k & 7) of {b, a}; a set nibble bit 3
    replicates that byte's sign bit instead."""
    source = (b & 0xFFFFFFFF) << 32 | (a & 0xFFFFFFFF)
    out = 0
    for k in range(4):
        nibble = (selector >> (4 * k)) & 0xF
        byte = (source >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def lop3(a: int, b: int, c: int, table: int) -> int:
    out = 0
    for bit in range(32):
        index = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        out |= ((table >> index) & 1) << bit
    return out


def run(ptx: str, operands: dict[int, int]) -> dict[int, int]:
    """Runs one inline-asm block on `operands` ($n -> 32-bit value); returns the written $n."""
    regs = {f"${n}": value & 0xFFFFFFFF for n, value in operands.items()}

    def value(token: str) -> int:
        token = token.strip()
        return regs[token] if token in regs else int(token, 0) & 0xFFFFFFFF

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):  # unpack a b32 into two b16
            low, high, source = re.match(r"\{([$\w]+), ([$\w]+)\}, (\S+)", rest).groups()
            regs[low], regs[high] = value(source) & 0xFFFF, value(source) >> 16
            continue
        if op == "mov.b32" and "{" in rest:  # pack two b16 into a b32
            dest, low, high = re.match(r"(\S+), \{([$\w]+), ([$\w]+)\}", rest).groups()
            regs[dest] = (value(low) & 0xFFFF) | (value(high) & 0xFFFF) << 16
            continue
        dest, *args = [token.strip() for token in rest.split(",")]
        if op == "mov.b32":
            result = value(args[0])
        elif op == "shr.u32":
            result = value(args[0]) >> value(args[1])
        elif op == "and.b32":
            result = value(args[0]) & value(args[1])
        elif op == "xor.b32":
            result = value(args[0]) ^ value(args[1])
        elif op == "lop3.b32":
            result = lop3(*(value(arg) for arg in args))
        elif op == "prmt.b32":
            result = prmt(*(value(arg) for arg in args))
        elif op in ("sub.rn.f16x2", "mul.rn.f16x2"):
            (a0, a1), (b0, b1) = _halves(value(args[0])), _halves(value(args[1]))
            result = _join(a0 - b0, a1 - b1) if op.startswith("sub") else _join(a0 * b0, a1 * b1)
        elif op == "fma.rn.f16x2":
            (a0, a1), (b0, b1), (c0, c1) = (_halves(value(arg)) for arg in args)
            result = _join(np.float64(a0) * np.float64(b0) + c0, np.float64(a1) * np.float64(b1) + c1)
        elif op == "add.rn.f16":
            result = _bits16(_f16(value(args[0])) + _f16(value(args[1])))
        elif op == "cvt.f32.f16":
            result = int(np.array([_f16(value(args[0]))], dtype=np.float32).view(np.uint32)[0])
        else:
            raise NotImplementedError(op)
        regs[dest] = result & 0xFFFFFFFF
    return {int(name[1:]): regs[name] for name in regs if name.startswith("$") and int(name[1:]) not in operands}
