"""The SASS check that sm90_compile.py runs on the W4 Gluon kernels, on loops written here: it finds a
write to an in-flight wgmma's register operand, and passes registers that alternate or are written
only once their wgmma is retired."""

from sass_hazards import hazards, written  # beside this file (pytest puts its folder on the path)


def loop(second_operand: str, retire_before_writing: bool = False, after: str = "") -> str:
    """A loop whose turn waits on a barrier (a retry loop of its own), makes weights in R40-R43 (or
    waits first), issues a wgmma on R40, then one on `second_operand`, keeping one group in flight;
    `after` the loop, before the last wait."""
    wait = "        /*0010*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n" if retire_before_writing else ""
    return (".L_x_1:\n" + wait +
            ".L_x_2:\n"
            "        /*0014*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], RZ ;\n"
            "        /*0018*/              @!P1 BRA `(.L_x_2) ;\n"
            "        /*0020*/                   HMUL2 R40, R40, R50.H0_H0 ;\n"
            "        /*0030*/                   LDS.128 R44, [R2+0x100] ;\n"
            "        /*0040*/                   HGMMA.64x64x16.F32 R0, R40, gdesc[UR4], R0, gsb0 ;\n"
            "        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n"
            "        /*0060*/                   HFMA2 R45, R45, R51, R52 ;\n"
            f"        /*0070*/                   HGMMA.64x64x16.F32 R0, {second_operand}, gdesc[UR4], R0, gsb0 ;\n"
            "        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n"
            "        /*0090*/              @P0 BRA `(.L_x_1) ;\n" + after +
            "        /*00a0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n"
            "        /*00b0*/                   MOV R44, RZ ;\n"
            "        /*00c0*/                   EXIT ;\n")


def test_a_write_to_a_wgmma_still_reading_its_registers_is_found():
    # the next turn's HMUL2 rewrites R40 while the second wgmma reads R40-R43
    assert len(hazards(loop("R40"))) == 1
    # the second wgmma reads R44-R47, which the HFMA2 between the two wgmmas writes: not a hazard
    # (written before the wgmma is issued) but the LDS.128 of the next turn is
    assert [found.split(" writes ")[1] for found in hazards(loop("R44"))] == ["[44, 45, 46, 47]"]


def test_every_path_is_walked():
    # past the loop's exit, before the last wait; predicated; a shuffle's register after its predicate
    for write, registers in (("@P2 IADD3 R53, R1, 0x1, RZ", "[53]"), ("SHFL.IDX PT, R54, R1, RZ, 0x1f", "[54]")):
        after = f"        /*0094*/                   {write} ;\n"
        assert [found.split(" writes ")[1] for found in hazards(loop("R52", after=after))] == [registers]
    assert hazards(loop("R52")) == []


def test_registers_written_once_their_wgmma_is_retired_pass():
    assert hazards(loop("R48")) == []
    assert hazards(loop("R44", retire_before_writing=True)) == []


def test_what_an_instruction_writes():
    assert written("LDS.128 R44, [R2]") == {44, 45, 46, 47}
    assert written("@!P1 IMAD.64 R8, R2, R3, R4") == {8, 9}
    assert written("STS [R2], R40") == set() and written("HGMMA.64x64x16.F32 R0, R40, gdesc[UR4], R0") == set()
    assert written("ISETP.GE.AND P0, PT, R2, R3, PT") == set() and written("SHFL.BFLY PT, R9, R8, 0x1, 0x1f") == {9}
