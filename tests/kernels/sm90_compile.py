"""Compile qtool's Triton kernels for sm_90 (Hopper) with Triton's own ptxas, no GPU needed: what
a GPU-less machine can check of the GPU path (PTX syntax, inline-asm operands, layouts, register
limits). Run as a script in a process without TRITON_INTERPRET (the interpreter replaces the
kernels); prints one line per kernel compiled."""

import os
import subprocess
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "run without the interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

import sass_hazards  # noqa: E402
from qtool.kernels import (elementwise, gluon_hopper, int8_matmul, int8_wgmma, paged_attention,  # noqa: E402
                          quant_matmul, w4_fragments, w4_wgmma)

FLOATS = {"eps", "scale"}  # scalars passed as float; the others are int32
# what a launch on model shapes specialises on: pointers and these sizes divisible by 16 (without it
# loads are not vectorised, and none goes through cp.async)
ALIGNED = {"N", "K"}


def compile_for_sm90(kernel, constexprs: dict, pointers: dict | None = None, num_warps: int = 4,
                     options: dict | None = None) -> str:
    """Pointers default to fp16 (`pointers` names others), scalars to int32 (float32 for FLOATS);
    pointers and ALIGNED sizes divisible by 16; `options` as the launch passes them. Returns the
    PTX."""
    pointers = pointers or {}
    signature, attrs = {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*fp16")
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
        if name.endswith("_ptr") or name in ALIGNED:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **(options or {})})
    assert compiled.asm["cubin"]
    print(kernel.__name__, constexprs)
    return compiled.asm["ptx"]


def compile_gluon_for_sm90(kernel, descriptors: dict, pointers: dict, constexprs: dict, num_warps: int,
                           register_operands: bool = False) -> str:
    """A Gluon kernel, its tensor descriptors' types taken from `descriptors` (of CPU tensors); pointers
    float32 unless `pointers` names them, scalars int32; its wgmmas kept in flight, none of their
    register operands (which it has with `register_operands`) written while they read them. Returns
    the PTX."""
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = {param.name: "constexpr" if param.is_constexpr else mangle_type(descriptors[param.name])
                 if param.name in descriptors else pointers.get(param.name, "*fp32") if param.name.endswith("_ptr")
                 else "i32" for param in kernel.params}
    compiled = triton.compile(GluonASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs,
                                                                                             num_warps=num_warps)),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"]
    assert_wgmmas_in_flight(compiled.asm["ptx"])
    sass = sass_hazards.disassemble(compiled.asm["cubin"], nvdisasm())
    assert (sass_hazards.wgmmas_reading_registers(sass) > 0) == register_operands
    assert not (found := sass_hazards.hazards(sass)), found
    print(kernel.__name__, constexprs)
    return compiled.asm["ptx"]


def nvdisasm() -> str:
    """The nvdisasm shipped beside the ptxas the compile used."""
    from triton.backends.nvidia.compiler import get_ptxas

    return str(Path(get_ptxas(90).path).with_name("nvdisasm"))


def assert_wgmmas_in_flight(ptx: str) -> None:
    """ptxas keeps the kernel's wgmmas in flight: where it cannot (its note C7515; say the accumulator
    is set by another instruction on some path through the pipeline) it waits for each wgmma as soon as
    it is issued, and the kernels' overlap of a step's wgmma with the next step's work is lost."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the ptxas the compile used
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        notes = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(source), "-o", str(source.with_suffix(".cubin"))],
                               capture_output=True, text=True, check=True).stderr
    assert "C7515" not in notes, notes


def compile_int8_wgmma(block_m: int, block_n: int, block_k: int, num_warps: int, stages: int, split: bool) -> str:
    descriptors = {"a_desc": gluon_hopper.descriptor(torch.zeros(256, 4096, dtype=torch.int8), [block_m, block_k]),
                   "w_desc": gluon_hopper.descriptor(torch.zeros(1024, 4096, dtype=torch.int8), [block_n, block_k])}
    return compile_gluon_for_sm90(int8_wgmma._wgmma_gemm_kernel, descriptors,
                                  {"y_ptr": "*fp16", "ws_ptr": "*i32", "arrivals_ptr": "*i32"},
                                  dict(HAS_BIAS=True, SPLIT=split, GROUP_M=8, STAGES=stages), num_warps)


def compile_w4_wgmma(block_m: int, block_n: int, stages: int, zeros: bool, split: bool, pending: bool, group: int,
                     num_warps: int, fragments: bool = False) -> str:
    """w4_wgmma's kernel, or with `fragments` w4_fragments', for a 4096 x 1024 weight."""
    weight = quant_matmul.KernelWeight.from_rows(
        torch.zeros(1024, 512, dtype=torch.int32), 4, 4096, 64, scales=torch.zeros(1024, 64, dtype=torch.float16),
        zeros=torch.zeros(1024, 64, dtype=torch.int32) if zeros else None)
    weight.fragments = torch.zeros(512, 1024, dtype=torch.int32)
    module, kernel = (w4_fragments, w4_fragments._fragments_kernel) if fragments else (w4_wgmma, w4_wgmma._w4_kernel)
    made = module.descriptors(torch.zeros(block_m, 4096, dtype=torch.float16), weight, block_m, block_n)
    ptx = compile_gluon_for_sm90(kernel, dict(zip(("x_desc", "w_desc", "s_desc", "z_desc"), made)),
                                 {"y_ptr": "*fp16", "arrivals_ptr": "*i32"},
                                 dict(GROUP=group, HAS_ZEROS=zeros, SPLIT=split, PENDING=pending, BLOCK_N=block_n,
                                      STAGES=stages, PDL=True), num_warps, register_operands=fragments)
    # launched as a programmatic dependent: the first STAGES - 1 steps' words, scales (and zero points)
    # requested before the one wait for the kernel before, their x tiles after it, before the first step
    wait = ptx.index("griddepcontrol.wait")
    first_step = ptx.index("mbarrier.try_wait", wait)
    copies = "cp.async.bulk.tensor"
    assert ptx.count("griddepcontrol.wait") == 1
    assert ptx[:wait].count(copies) == (stages - 1) * (3 if zeros else 2), "weights not requested before the wait"
    assert ptx[wait:first_step].count(copies) == stages - 1, "x not requested after the wait"
    return ptx


def main() -> None:
    words = {"w_ptr": "*i32", "z_ptr": "*u8", "ws_ptr": "*fp32", "arrivals_ptr": "*i32"}
    matmul = dict(words, oc_ptr="*i32", oo_ptr="*i32")
    # one token on the CUDA cores; a dot (mma, wgmma), its weights in float32 or half2 arithmetic, its
    # operands swapped (the weights first); tables of 16 and 8 entries looked up in registers; the
    # product left pending (added into the caller's sums)
    for bits, block_m, block_k, half2, swap, entries, pending in (
            (4, 1, 256, False, False, 0, False), (4, 16, 128, False, False, 0, False),
            (4, 64, 128, True, False, 0, False), (8, 16, 128, True, False, 0, False),
            (4, 16, 128, False, True, 0, False), (4, 64, 128, True, True, 0, False), (4, 16, 64, True, True, 16, False),
            (4, 64, 64, True, True, 8, False), (4, 16, 64, True, True, 0, True)):
        compile_for_sm90(quant_matmul._matmul_kernel, dict(BITS=bits, GROUP=64, HAS_ZEROS=not entries,
                                                           HAS_LUT=bool(entries), LUT_SIZE=max(entries, 1),
                                                           HAS_OUTLIERS=False, SPLIT=not pending, PENDING=pending,
                                                           EVEN_N=True,
                                                           EVEN_K=True, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=block_k,
                                                           STAGES=3, HALF2=half2, SWAP=swap, ASM=True, PDL=True),
                         matmul)
    # one or two tokens in half2: uniform grids; tables of 16 and 8 entries (outliers with the first); the next
    # tile in registers, or tiles ahead through shared memory (STAGES 3); left pending
    for bits, entries, outliers, tokens, stages, pending in (
            (4, 0, False, 1, 1, False), (8, 0, False, 1, 1, False), (4, 0, False, 2, 1, False),
            (8, 0, False, 2, 1, False), (4, 16, True, 1, 1, False), (4, 16, True, 2, 1, False),
            (4, 8, False, 1, 1, False), (4, 0, False, 1, 3, False), (4, 0, False, 2, 3, False),
            (4, 16, True, 1, 3, False), (4, 0, False, 1, 3, True)):
        compile_for_sm90(quant_matmul._half2_kernel, dict(BITS=bits, GROUP=64, HAS_ZEROS=not entries,
                                                          HAS_LUT=bool(entries), LUT_SIZE=max(entries, 1),
                                                          HAS_OUTLIERS=outliers, SPLIT=not pending, PENDING=pending,
                                                          EVEN_N=True, BLOCK_N=256,
                                                          EVEN_K=True, BLOCK_K=64, TOKENS=tokens, STAGES=stages,
                                                          ASM=True, PDL=True), matmul, num_warps=2, options={"num_stages": stages})
    compile_for_sm90(quant_matmul._dequantize_kernel, dict(BITS=4, GROUP=64, HAS_ZEROS=True, HAS_LUT=False, LUT_SIZE=1,
                                                           EVEN_N=True, EVEN_K=True, BLOCK_N=128, BLOCK_K=64), words)
    scales = {"s_ptr": "*fp32", "sa_ptr": "*fp32", "sw_ptr": "*fp32"}
    compile_for_sm90(int8_matmul._quantize_kernel, dict(ROW=4096), dict(scales, q_ptr="*i8"))
    compile_for_sm90(int8_matmul._gemm_kernel, dict(HAS_BIAS=False, SPLIT=False, EVEN_K=True, BLOCK_M=128, BLOCK_N=128,
                                                    BLOCK_K=128, GROUP_M=8, STAGES=3),
                     dict(scales, a_ptr="*i8", w_ptr="*i8", ws_ptr="*fp32", arrivals_ptr="*i32"), num_warps=8)
    compile_for_sm90(int8_matmul._epilogue_kernel, dict(HAS_BIAS=False, BLOCK_M=64, BLOCK_N=128),
                     dict(scales, sums_ptr="*i32"))
    if int8_wgmma.available():  # each wgmma left in flight while the next is issued (one outstanding)
        # the tuner's kinds of tile: 256 inputs a step (two TMA boxes of 128) in a ring of 6, split; two
        # warpgroups a tile; a 128-row tile of one warpgroup (two wgmma rows)
        for block_m, block_n, block_k, warps, stages, split in ((64, 64, 256, 4, 6, True), (128, 256, 128, 8, 4, False),
                                                                (128, 128, 128, 4, 3, False)):
            ptx = compile_int8_wgmma(block_m, block_n, block_k, warps, stages, split)
            assert "wgmma.wait_group.sync.aligned 1;" in ptx and "wgmma.mma_async.sync.aligned" in ptx
            assert ".s32.s8.s8" in ptx
        # W4: split with zero points, 16 tokens; left pending, symmetric, one group a row, 64 tokens x 128
        # outputs in two warpgroups; 128 tokens
        for block_m, block_n, stages, zeros, split, pending, group, warps in (
                (16, 64, 4, True, True, False, 64, 4), (64, 128, 4, False, False, True, quant_matmul.ONE_GROUP, 8),
                (128, 64, 3, True, False, False, 128, 4)):
            ptx = compile_w4_wgmma(block_m, block_n, stages, zeros, split, pending, group, warps)
            assert "wgmma.wait_group.sync.aligned 1;" in ptx and "sub.rn.f16x2" in ptx
            assert "wgmma.mma_async.sync.aligned.m64n%dk16.f32.f16.f16" % block_m in ptx
        # W4 from register fragments: 8 tokens split, with zero points; 16 pending, symmetric, one group a
        # row; 128 tokens x 256 outputs; 256 tokens x 128 outputs in two warpgroups. Between a step's
        # barrier wait and its wgmma nothing goes through shared memory but the TMA'd operands' loads: no
        # store or shuffle, one barrier (Triton's, before the scales' read: w4_wgmma's step has its tile's
        # store, fence and barrier besides). Tiles of _IN_FLIGHT_FROM tokens or more leave a wgmma in flight
        for block_m, block_n, zeros, split, pending, group, warps in (
                (8, 128, True, True, False, 64, 4), (16, 64, False, False, True, quant_matmul.ONE_GROUP, 4),
                (128, 256, True, False, False, 128, 4), (256, 128, True, False, False, 64, 8)):
            ptx = compile_w4_wgmma(block_m, block_n, 4, zeros, split, pending, group, warps, fragments=True)
            # the last step (the loop's steps come earlier in the PTX)
            last = ptx.rindex("mbarrier.try_wait")
            step = ptx[last:ptx.index("wgmma.wait_group.sync.aligned", last)]
            in_flight = "wgmma.wait_group.sync.aligned 1;" in ptx
            assert in_flight == (block_m >= w4_fragments._IN_FLIGHT_FROM.value), (block_m, in_flight)
            assert "st.shared" not in step and "shfl" not in step, "the fragments left registers"
            assert step.count("bar.sync") <= 1
            assert "wgmma.mma_async.sync.aligned.m64n%dk16.f32.f16.f16" % block_m in ptx and "sub.rn.f16x2" in ptx
    else:
        print("no Gluon\n" * 10, end="")  # the count stays: this Triton has no Hopper Gluon to compile
    decode = {"tables_ptr": "*i32", "lens_ptr": "*i32", "max_ptr": "*fp32", "sum_ptr": "*fp32",
              "values_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
    for split in (False, True):
        compile_for_sm90(paged_attention._decode_kernel, dict(HEADS=32, GROUP=4, GROUP_PAD=16, BLOCK_SIZE=16,
                                                              HEAD_DIM=128, HEAD_DIM_PAD=128, TILE=64,
                                                              PRECISION="tf32", SCALED=False, SPLIT=split, PDL=True),
                         decode)
    for scaled in (False, True):  # an fp16 cache; a float8 one
        compile_for_sm90(paged_attention._prefill_kernel, dict(HEADS=32, GROUP=4, BLOCK_SIZE=16, HEAD_DIM=128,
                                                               HEAD_DIM_PAD=128, TILE=64, PRECISION="tf32",
                                                               SCALED=scaled),
                         dict(decode, starts_ptr="*i32", k_ptr="*fp8e4nv" if scaled else "*fp16",
                              v_ptr="*fp8e4nv" if scaled else "*fp16"))
    compile_for_sm90(paged_attention._merge_kernel, dict(HEADS=32, HEAD_DIM=128, HEAD_DIM_PAD=128, PARTITIONS=16,
                                                         PARTITIONS_PAD=16, PDL=True),
                     {"max_ptr": "*fp32", "sum_ptr": "*fp32", "values_ptr": "*fp32"})
    # the readers of a product: of fp16 activations, or of a pending product's float32 sums
    # (launched on Hopper as programmatic dependents: PDL, each program waiting first)
    rounding, half = elementwise.TORCH_ROUNDING, dict(DTYPE=tl.float16, PDL=True)
    for residual, pending in ((False, False), (True, False), (True, True)):
        compile_for_sm90(elementwise._rms_norm_kernel, dict(HAS_RESIDUAL=residual, PENDING=pending, BLOCK=4096, **half),
                         {"x_ptr": "*fp32"} if pending else None, num_warps=16, options=rounding)
    for store, pending in ((False, False), (True, False), (True, True)):  # keys packed; into their cache slots
        sums = {name: "*fp32" for name in ("q_ptr", "k_ptr", "v_ptr") if pending}
        rotary = compile_for_sm90(elementwise._rotary_kernel, dict(HEADS=32, KV_HEADS=8, HALF=64, HALF_PAD=64,
                                                                   STORE=store, PENDING=pending, **half),
                                  {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "slots_ptr": "*i32", **sums}, num_warps=1,
                                  options=rounding)
        assert "fma" not in rotary, "x * cos + turned * sin contracted into an FMA: torch rounds each product"
        assert "griddepcontrol.wait" in rotary, "a kernel launched as a programmatic dependent must wait first"
    for pending in (False, True):
        compile_for_sm90(elementwise._silu_mul_kernel, dict(PENDING=pending, BLOCK=1024, **half),
                         {"gate_ptr": "*fp32", "up_ptr": "*fp32"} if pending else None, options=rounding)


if __name__ == "__main__":
    main()
