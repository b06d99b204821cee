"""Writes to a register operand of a wgmma still in flight, found in a kernel's SASS (nvdisasm -c).

A wgmma (HGMMA) whose first operand A is in registers reads them until a later WARPGROUP.DEPBAR
retires its group; ptxas does not guard them (PTX leaves that to the program), so an instruction that
writes one of them in between corrupts the product, only when the wgmma is slow enough to still be
reading. The walk goes forward from each such wgmma in program order and follows a backward branch
(the loop's next turn) once."""

import re
import subprocess
import tempfile
from pathlib import Path

_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_REGISTER_A = re.compile(r"HGMMA\S*\s+R\d+,\s+R(\d+),")
_RETIRE = re.compile(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x(\d+)")
_BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)")
# opcodes whose first operand is no register they write
_NO_DESTINATION = ("ST", "BAR", "BRA", "HGMMA", "WARPGROUP", "SYNCS", "RED", "EXIT", "NOP", "BSYNC", "BSSY", "UTMA",
                   "WARPSYNC", "FENCE", "CCTL", "RET", "DEPBAR", "MEMBAR")


def disassemble(cubin: bytes, nvdisasm: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, check=True).stdout


def written(instruction: str) -> set:
    """The registers an instruction writes: its first operand, 1, 2 or 4 of them wide."""
    opcode, _, operands = re.sub(r"^@!?U?P\w+\s+", "", instruction).partition(" ")
    destination = re.fullmatch(r"R(\d+)", operands.split(",")[0].strip())
    if destination is None or opcode.startswith(_NO_DESTINATION):
        return set()
    wide = re.search(r"\.(64|128)\b", opcode)
    first = int(destination.group(1))
    return set(range(first, first + (int(wide.group(1)) // 32 if wide else 1)))


def hazards(sass: str) -> list:
    """'wgmma at ADDRESS: INSTRUCTION writes [registers]' for each write to an in-flight wgmma's A."""
    lines = [(int(m.group(1), 16), m.group(2)) if (m := _INSTRUCTION.match(line)) else (None, label.group(1))
             for line in sass.splitlines() if (m := _INSTRUCTION.match(line)) or (label := _LABEL.match(line))]
    labels = {text: index for index, (address, text) in enumerate(lines) if address is None}
    found = []
    for start, (address, text) in enumerate(lines):
        operand = _REGISTER_A.match(text) if address is not None else None
        if operand is None:
            continue
        registers = set(range(int(operand.group(1)), int(operand.group(1)) + 4))
        committed, newer, turned, index = "gsb0" in text, 0, False, start + 1
        while index < len(lines):
            at, instruction = lines[index]
            index += 1
            if at is None:
                continue
            retire = _RETIRE.match(instruction)
            if committed and retire and newer >= int(retire.group(1)):
                break  # at most that many groups stay in flight, and `newer` came after ours: it is done
            if instruction.startswith("HGMMA") and "gsb0" in instruction:
                newer, committed = newer + committed, True
            if overlap := written(instruction) & registers:
                found.append(f"wgmma at {address:#x}: {at:#x} {instruction} writes {sorted(overlap)}")
            branch = _BRANCH.search(instruction)
            if branch and labels[branch.group(1)] < index and not turned:
                turned, index = True, labels[branch.group(1)]
    return found
