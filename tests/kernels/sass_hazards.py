"""Writes to a register operand of a wgmma still in flight, found in a kernel's SASS (nvdisasm -c).

A wgmma (HGMMA) whose first operand A is in registers reads them until a later WARPGROUP.DEPBAR
retires its group; ptxas does not guard them (PTX leaves that to the program), so an instruction that
writes one of them in between corrupts the product, only when the wgmma is slow enough to still be
reading. From each such wgmma every path is walked (branches taken and not, loops until a state
repeats) until its group is retired."""

import re
import subprocess
import tempfile
from pathlib import Path

_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_REGISTER_A = re.compile(r"(?:@!?P\w+\s+)?HGMMA\S*\s+R\d+,\s+R(\d+),")
_RETIRE = re.compile(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)")
_BRANCH = re.compile(r"^(@!?P\w+\s+)?BRA(?:\.\w+)*\s+`?\(?(\.L_x_\d+)")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")
# opcodes whose first operand is no register they write
_NO_DESTINATION = ("ST", "BAR", "BRA", "HGMMA", "WARPGROUP", "SYNCS", "RED", "EXIT", "NOP", "BSYNC", "BSSY", "UTMA",
                   "WARPSYNC", "FENCE", "CCTL", "RET", "DEPBAR", "MEMBAR")
# opcodes whose register destination follows a predicate destination
_PREDICATE_FIRST = ("SHFL", "ATOM")


def disassemble(cubin: bytes, nvdisasm: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, check=True).stdout


def written(instruction: str) -> set:
    """The registers an instruction writes: its register destination, 1, 2 or 4 of them wide."""
    opcode, _, operands = _PREDICATE.sub("", instruction).partition(" ")
    if opcode.startswith(_NO_DESTINATION):
        return set()
    operands = [operand.strip() for operand in operands.split(",")]
    if opcode.startswith(_PREDICATE_FIRST) and len(operands) > 1:
        operands = operands[1:]
    destination = re.fullmatch(r"R(\d+)", operands[0])
    if destination is None:
        return set()
    wide = re.search(r"\.(64|128)\b", opcode)
    first = int(destination.group(1))
    return set(range(first, first + (int(wide.group(1)) // 32 if wide else 1)))


def _program(sass: str) -> tuple[list, dict]:
    """The instructions in order ((address, text); labels as (None, name)) and each label's index."""
    lines = []
    for line in sass.splitlines():
        if instruction := _INSTRUCTION.match(line):
            lines.append((int(instruction.group(1), 16), instruction.group(2)))
        elif label := _LABEL.match(line):
            lines.append((None, label.group(1)))
    return lines, {text: index for index, (address, text) in enumerate(lines) if address is None}


def wgmmas_reading_registers(sass: str) -> int:
    return sum(1 for address, text in _program(sass)[0] if address is not None and _REGISTER_A.match(text))


def hazards(sass: str) -> list:
    """'wgmma at ADDRESS: ADDRESS INSTRUCTION writes [registers]' for each write to an in-flight
    wgmma's A registers on some path from it."""
    lines, labels = _program(sass)
    found = []
    for start, (address, text) in enumerate(lines):
        operand = _REGISTER_A.match(text) if address is not None else None
        if operand is None:
            continue
        registers = set(range(int(operand.group(1)), int(operand.group(1)) + 4))
        # a state: the next instruction, whether our group is committed, how many groups came after it
        pending, seen = [(start + 1, "gsb0" in text, 0)], set()
        while pending:
            state = pending.pop()
            index, committed, newer = state
            if state in seen or index >= len(lines):
                continue
            seen.add(state)
            at, instruction = lines[index]
            if at is None:
                pending.append((index + 1, committed, newer))
                continue
            retire = _RETIRE.match(_PREDICATE.sub("", instruction))
            if committed and retire and newer >= int(retire.group(1), 16):
                continue  # at most that many groups stay in flight, and `newer` came after ours: it is done
            if "HGMMA" in instruction and "gsb0" in instruction:
                committed, newer = True, newer + committed
            if overlap := written(instruction) & registers:
                found.append(f"wgmma at {address:#x}: {at:#x} {instruction} writes {sorted(overlap)}")
            branch = _BRANCH.match(instruction)
            if branch:
                pending.append((labels[branch.group(2)], committed, min(newer, 8)))
            if not (branch and branch.group(1) is None) and not instruction.startswith(("EXIT", "RET")):
                pending.append((index + 1, committed, min(newer, 8)))
    return sorted(set(found))
