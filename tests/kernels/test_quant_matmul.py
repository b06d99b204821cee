"""The quantized matmul kernel against its torch reference, on random inputs of odd shapes: under
TRITON_INTERPRET=1 on a machine without a GPU (small shapes), on the GPU where there is one."""

from dataclasses import replace

import pytest
import torch
import triton

from qtool.kernels.quant_matmul import (PENDING_TOKENS, KernelWeight, candidates, quant_matmul, reference,
                                       triton_matmul, with_fragments)
from qtool.quantize import packing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1)  # small tiles keep the interpreter quick; a dot
HALF2_TILES = dict(SMALL, HALF2=True)  # the dot's weights made two at a time in half2 arithmetic
SWAPPED = dict(SMALL, SWAP=True)  # y^T = W x^T: the weights as the dot's first operand
ONE_TOKEN = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=0)  # the CUDA-core path, one program per 32 inputs
HALF2 = dict(ONE_TOKEN, HALF2=True)  # one token in half2 arithmetic (PTX on a GPU, Triton's operations here)
PIPELINED = dict(HALF2, num_stages=3)  # its tiles loaded ahead by Triton's pipeliner (through shared memory)
DEQUANTIZE = dict(DEQUANTIZE=True, BLOCK_N=16, BLOCK_K=32)  # W^T by the Triton kernel, then cuBLAS


def uniform_weight(n: int, k: int, bits: int, group_size: int, symmetric: bool, dtype=torch.float16) -> KernelWeight:
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.int32)
    scales = (torch.rand(n, groups) * 0.02 + 0.001).to(dtype)
    zeros = None if symmetric else torch.randint(0, 2**bits, (n, groups), dtype=torch.int32)
    return KernelWeight.from_rows(packing.pack(codes, bits).to(DEVICE), bits, k, group_size, scales=scales.to(DEVICE),
                                  zeros=None if zeros is None else zeros.to(DEVICE))


def lut_weight(n: int, k: int, entries: int, group_size: int, outliers: float = 0.0) -> KernelWeight:
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, entries, (n, k), dtype=torch.int32)
    lut = (torch.randn(n, groups, entries) * 0.02).half()
    parts = {}
    if outliers:
        mask = torch.rand(n, k) < outliers
        rows, columns = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=n)
        parts = dict(outlier_values=(torch.randn(len(rows)) * 0.2).half().to(DEVICE),
                     outlier_columns=columns.to(torch.int32).to(DEVICE),
                     outlier_row_offsets=torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).to(DEVICE))
    return KernelWeight.from_rows(packing.pack(codes, 4).to(DEVICE), 4, k, group_size, lut=lut.to(DEVICE), **parts)


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def check(weight: KernelWeight, m: int, config: dict = SMALL, dtype=torch.float16, tolerance: float = 2e-3
          ) -> torch.Tensor:
    """The kernel's y against the reference's, for random x (returned)."""
    x = torch.randn(m, weight.in_features, dtype=dtype, device=DEVICE)
    out = triton_matmul(x, weight, config=config)
    assert out.dtype == x.dtype and out.shape == (m, weight.out_features) and torch.isfinite(out).all()
    assert relative_error(out, reference(x, weight)) < tolerance
    return x


def test_codes_are_read_in_the_canonical_packing():
    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (5, 40), dtype=torch.int32)
        weight = KernelWeight.from_rows(packing.pack(codes, bits), bits, 40, -1, scales=torch.ones(5, 1))
        assert torch.equal(weight.codes(), codes.long())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_uniform_grids_match_the_reference(bits, group_size, symmetric, m):
    check(uniform_weight(48, 192, bits, group_size, symmetric), m)  # N, K not powers of two
    check(uniform_weight(48, 192, bits, group_size, symmetric), m, config=HALF2_TILES)
    check(uniform_weight(48, 192, bits, group_size, symmetric), m, config=dict(HALF2_TILES, SWAP=True, BLOCK_K=64))
    check(uniform_weight(48, 192, bits, group_size, symmetric), m, config=ONE_TOKEN)
    check(uniform_weight(48, 192, bits, group_size, symmetric), m, config=HALF2)
    check(uniform_weight(48, 192, bits, group_size, symmetric), m, config=dict(HALF2, BLOCK_K=64))  # 2 groups of 32
    check(uniform_weight(48, 192, bits, group_size, symmetric), m, config=dict(HALF2, SPLIT_K=2, BLOCK_M=2))  # two tokens a program
    check(uniform_weight(48, 192, bits, group_size, symmetric), m, config=dict(PIPELINED, BLOCK_K=64, SPLIT_K=2))
    check(uniform_weight(48, 192, bits, group_size, symmetric), m, config=DEQUANTIZE)


@pytest.mark.parametrize("config", [SMALL, HALF2_TILES, SWAPPED, dict(HALF2_TILES, SWAP=True, BLOCK_K=64)])
@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 64, False), (8, -1, True)])
def test_dot_weights_are_the_references_exactly(config, bits, group_size, symmetric):
    """One-hot tokens read single weights out: each must be (q - z) s rounded once to fp16."""
    weight = uniform_weight(40, 192, bits, group_size, symmetric)
    picked = torch.randperm(192)[:16]
    x = torch.zeros(16, 192, dtype=torch.float16, device=DEVICE)
    x[torch.arange(16), picked] = 1.0
    assert torch.equal(triton_matmul(x, weight, config=config), reference(x, weight))

@pytest.mark.parametrize("config", [HALF2, dict(HALF2, BLOCK_M=2), PIPELINED, dict(HALF2_TILES, SWAP=True)])
@pytest.mark.parametrize("entries", [16, 8])
def test_half2_table_lookups_read_every_entry_exactly(entries, config):
    """One-hot tokens read single table entries out (one token a program, or a dot): each code of
    each word slot must select its own entry (the PRMT byte planes on a GPU)."""
    weight = lut_weight(40, 192, entries, -1)
    x = torch.zeros(16, 192, dtype=torch.float16, device=DEVICE)
    x[torch.arange(16), torch.randperm(192)[:16]] = 1.0
    assert torch.equal(triton_matmul(x, weight, config=config), reference(x, weight))


@pytest.mark.parametrize("bits", [4, 8])
def test_half2_sums_stay_finite_for_large_fp16_inputs(bits):
    """The half2 path sums a word's products in fp16; large inputs must not overflow them."""
    weight = uniform_weight(32, 128, bits, 64, False)
    x = torch.randn(1, 128, dtype=torch.float16, device=DEVICE)
    x[0, :8] = 3000.0  # unscaled, 4 products x (q - z) of up to 45000 each would overflow fp16
    out = triton_matmul(x, weight, config=HALF2)
    assert torch.isfinite(out).all() and relative_error(out, reference(x, weight)) < 2e-3


def test_the_half2_path_refuses_weights_it_cannot_compute():
    x = torch.randn(1, 192, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="half2"):  # tables per group: one token in half2 takes one table per row
        triton_matmul(x, lut_weight(16, 192, 16, 64), config=HALF2)
    with pytest.raises(ValueError, match="half2"):
        triton_matmul(x.bfloat16(), uniform_weight(16, 192, 4, 64, False, torch.bfloat16), config=HALF2)
    with pytest.raises(ValueError, match="half2"):
        triton_matmul(x.expand(3, -1), lut_weight(16, 192, 16, 64), config=HALF2_TILES)
    with pytest.raises(ValueError, match="half2"):  # float32 scales: the dot's half2 weights would round twice
        triton_matmul(x.expand(3, -1), uniform_weight(16, 192, 4, 64, False, torch.float32), config=HALF2_TILES)


@pytest.mark.parametrize("entries", [16, 8])  # 4-bit tables, and 3-bit ones with their codes in 4-bit slots
@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("m", [1, 17])
def test_lookup_tables_match_the_reference(entries, group_size, m):
    check(lut_weight(40, 192, entries, group_size), m)
    check(lut_weight(40, 192, entries, group_size), m, config=ONE_TOKEN)
    check(lut_weight(40, 192, entries, group_size), m, config=dict(SWAPPED, BLOCK_K=64))  # 8 rows of words
    if group_size == -1:  # one table per row: held in registers, looked up by PRMT on a GPU
        check(lut_weight(40, 192, entries, group_size), m, config=HALF2)
        check(lut_weight(40, 192, entries, group_size), m, config=dict(HALF2, BLOCK_M=2))
        check(lut_weight(40, 192, entries, group_size), m, config=dict(HALF2_TILES, SWAP=True, BLOCK_K=64))
    check(lut_weight(40, 192, entries, group_size), m, config=DEQUANTIZE)


@pytest.mark.parametrize("m", [1, 3])
def test_sparse_outliers_are_added_once(m):
    weight = lut_weight(40, 192, 16, -1, outliers=0.02)
    assert weight.max_row_outliers > 1
    check(weight, m)
    check(weight, m, config=dict(SMALL, SPLIT_K=3))  # each slot added by one share of K; one share empty
    check(weight, m, config=dict(SWAPPED, SPLIT_K=3))
    check(weight, m, config=dict(HALF2_TILES, SPLIT_K=3))
    check(weight, m, config=dict(ONE_TOKEN, SPLIT_K=2))
    check(weight, m, config=dict(HALF2, SPLIT_K=2))
    check(weight, m, config=dict(HALF2, SPLIT_K=2, BLOCK_M=2))
    check(weight, m, config=dict(HALF2, SPLIT_K=8))  # 6 tiles of 32 inputs: two shares read none
    check(weight, m, config=DEQUANTIZE)


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 64, False), (8, -1, True)])
def test_two_tokens_a_program_give_each_token_its_one_token_result(bits, group_size, symmetric):
    """The weights made once for two tokens: each token's products and sums are the one-token
    kernel's, bit for bit (an odd count leaves the last program's second token out)."""
    weight = uniform_weight(48, 192, bits, group_size, symmetric)
    x = torch.randn(5, 192, dtype=torch.float16, device=DEVICE)
    one = triton_matmul(x, weight, config=dict(HALF2, SPLIT_K=1))
    assert torch.equal(triton_matmul(x, weight, config=dict(HALF2, SPLIT_K=1, BLOCK_M=2)), one)


@pytest.mark.parametrize("tokens", [1, 2])
def test_pipelined_tiles_sum_as_the_register_prefetch_does(tokens):
    """Loading tiles ahead through shared memory changes where the words wait, not the sums: bit for
    bit the same results, with K in whole tiles and with a partial last tile."""
    for k in (192, 160):  # tiles of 64 inputs: 3, and 2.5
        weight = uniform_weight(48, k, 4, -1, False)
        x = torch.randn(3, k, dtype=torch.float16, device=DEVICE)
        prefetched = triton_matmul(x, weight, config=dict(HALF2, BLOCK_K=64, SPLIT_K=1, BLOCK_M=tokens))
        pipelined = triton_matmul(x, weight, config=dict(PIPELINED, BLOCK_K=64, SPLIT_K=1, BLOCK_M=tokens))
        assert torch.equal(pipelined, prefetched)


@pytest.mark.parametrize("config", [dict(SMALL, SPLIT_K=2), dict(SMALL, SPLIT_K=0), dict(ONE_TOKEN, SPLIT_K=3),
                                    dict(HALF2, BLOCK_K=128, SPLIT_K=3), dict(HALF2, SPLIT_K=3, BLOCK_M=2),
                                    dict(HALF2, BLOCK_K=64, SPLIT_K=16),  # 10 tiles: six shares read none
                                    dict(HALF2, BLOCK_K=64, SPLIT_K=16, BLOCK_M=2),
                                    dict(PIPELINED, BLOCK_K=64, SPLIT_K=16),
                                    dict(HALF2_TILES, SPLIT_K=3),
                                    dict(SWAPPED, SPLIT_K=3)])
def test_split_k_adds_every_share_once_and_leaves_the_workspace_zero(config):
    weight = uniform_weight(40, 640, 4, 64, False)
    for _ in range(3):  # the last program of each tile resets the workspace for the next launch
        check(weight, 3, config=config)


def test_a_weight_remembers_what_it_is_asked_once_and_its_copies_afresh():
    """What the launch path keeps per weight (tuned configurations, TMA descriptors): made once for a
    key, the same object after; a copy (new memory) or a `replace` (new tensors) makes its own."""
    weight = uniform_weight(24, 128, 4, 32, False)
    made = []
    first = weight.remembered("key", lambda: made.append(1) or object())
    assert weight.remembered("key", lambda: made.append(1) or object()) is first and len(made) == 1
    assert weight.remembered("other", lambda: made.append(1) or object()) is not first and len(made) == 2
    for other in (weight.copy(), replace(weight, fragments=None)):
        assert other.remembered("key", lambda: made.append(1) or object()) is not first
    assert len(made) == 4


def test_a_tail_of_columns_is_masked():
    check(uniform_weight(24, 128 + 32, 4, 32, False), 2)  # K not a multiple of 128
    check(uniform_weight(24, 128 + 32, 8, 32, False), 2, config=HALF2_TILES)
    check(uniform_weight(24, 128 + 32, 4, 32, False), 2, config=SWAPPED)
    check(uniform_weight(24, 128 + 32, 4, 32, False), 1, config=ONE_TOKEN)
    check(uniform_weight(24, 128 + 32, 4, -1, False), 1, config=dict(HALF2, BLOCK_K=64))
    check(uniform_weight(24, 128 + 32, 8, -1, True), 1, config=dict(HALF2, BLOCK_K=64))


@pytest.mark.skipif(DEVICE == "cpu", reason="the tuner's tiles (num_warps among them) compile for a GPU only")
@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 64, False), (8, -1, True)])
@pytest.mark.parametrize("m", [1, 2, 3, 16, 40, 200, 600])
def test_every_configuration_the_tuner_may_choose_matches_the_reference(bits, group_size, symmetric, m):
    """The tuner keeps whichever candidate is fastest, so each one must be right, at its own warps:
    finishing its product, and leaving it pending (what the runtime asks of up to PENDING_TOKENS
    tokens); on Hopper the Gluon kernels' tiles among them, of the 4-bit weight's fragment words too
    (200 tokens: tiles of 256 tokens in two warpgroups; 600: three such tiles, the last part empty)."""
    weight = with_fragments(uniform_weight(1536, 1024, bits, group_size, symmetric), torch.float16)
    sums = torch.zeros(m, weight.out_features, device=DEVICE)
    for config in candidates(m, weight, torch.float16):
        try:
            x = check(weight, m, config=config)
        except triton.runtime.errors.OutOfResources:
            # more shared memory than this GPU has (a Triton tile of 256 tokens of 8-bit codes on an H200):
            # the tuner passes it over too; the Gluon kernels' tiles must all fit
            assert not config.get("WGMMA"), config
            continue
        if m > PENDING_TOKENS:
            continue
        pending = triton_matmul(x, weight, config=config, sums=sums).result()
        assert relative_error(pending, reference(x, weight)) < 2e-3


@pytest.mark.skipif(DEVICE == "cpu", reason="Triton's interpreter multiplies bf16 tiles as integers (tl.dot)")
def test_bf16_activations():
    check(uniform_weight(24, 160, 4, 32, False, torch.bfloat16), 2, dtype=torch.bfloat16, tolerance=1e-2)
    check(uniform_weight(24, 160, 4, 32, False, torch.bfloat16), 2, config=SWAPPED, dtype=torch.bfloat16,
          tolerance=1e-2)


def test_every_output_is_written(monkeypatch):
    """The output is poisoned with NaN first; a tile the kernel skipped would stay NaN."""
    weight = uniform_weight(33, 128, 4, 64, True)
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: torch.full(shape, float("nan"), **kw))
    x = torch.randn(5, 128, dtype=torch.float16, device=DEVICE)
    assert torch.isfinite(triton_matmul(x, weight, config=SMALL)).all()


def test_the_dispatcher_uses_the_reference_where_no_kernel_runs():
    weight = uniform_weight(16, 96, 4, 32, False, torch.float32)
    x = torch.randn(4, 96, device=DEVICE)
    torch.testing.assert_close(quant_matmul(x, weight), x @ weight.dequantize().t())


def test_kernel_layouts_of_act_order_and_3_bit_table_weights():
    """What QuantLinear hands the kernel: act-order codes re-sorted by group (activations permuted
    alike), 3-bit table codes widened to 4-bit slots; the product is the weight's own."""
    from qtool.quantize.grid import fit_minmax, quantize_to_codes
    from qtool.quantize.qweight import QuantizedWeight
    from qtool.quantize.scheme import Scheme
    from qtool.quantize.squeezellm import squeeze
    from qtool.runtime.quant_linear import kernel_layout

    dense = torch.randn(40, 128) * 0.05
    scheme = Scheme(4, 32, False)
    grid = fit_minmax(dense, scheme, torch.float16)
    g_idx = torch.randperm(128).remainder(4).to(torch.int32)  # four groups of 32, scattered
    act_order = QuantizedWeight.from_codes(quantize_to_codes(dense, grid, scheme), grid, scheme, g_idx=g_idx)
    table = squeeze(dense, torch.rand(40, 128), Scheme(3, -1, lut=True), outliers=0.02)
    for weight in (act_order, table):
        layout = kernel_layout(weight.to(DEVICE), torch.float16)
        x = torch.randn(3, 128, dtype=torch.float16, device=DEVICE)
        expected = (x.float() @ weight.dequantize(torch.float16).float().t().to(DEVICE)).half()
        shuffled = x if layout.columns is None else x[:, layout.columns]
        assert relative_error(triton_matmul(shuffled, layout.weight, config=SMALL), expected) < 2e-3


def test_tuned_choices_are_stored_and_read_back(monkeypatch, tmp_path):
    """A later process takes the stored choice without timing; a choice that is no longer among the
    candidates, or another kernel source, is timed again. (The timing itself needs a GPU: here a
    table of fixed times stands in for it.)"""
    from qtool.kernels.quant_matmul import _Tuner

    monkeypatch.setenv("QTOOL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA Test GPU")
    times = {1: 3.0, 2: 1.0, 3: 2.0}
    timed = []

    def milliseconds(self, calls):
        return times[calls[0]()]

    monkeypatch.setattr(_Tuner, "milliseconds", milliseconds)
    source = tmp_path / "kernels.py"
    source.write_text("kernel source")
    candidates = [dict(BLOCK_N=n) for n in times]

    def launch(config):
        timed.append(config["BLOCK_N"])
        return config["BLOCK_N"]

    def launches():
        return [launch]

    key = (16, 4096, 14336, torch.float16)
    assert _Tuner(str(source)).choose(key, launches, candidates) == dict(BLOCK_N=2) and len(timed) == 3
    assert _Tuner(str(source)).choose(key, launches, candidates) == dict(BLOCK_N=2) and len(timed) == 3
    assert _Tuner(str(source)).choose(key, launches, candidates[:1] + candidates[2:]) == dict(BLOCK_N=3)
    assert len(timed) == 5
    source.write_text("changed kernel source")
    assert _Tuner(str(source)).choose(key, launches, candidates) == dict(BLOCK_N=2) and len(timed) == 8
    tuner = _Tuner(str(source))  # in one process: a choice the next caller is not offered is not handed out
    assert tuner.choose(key, launches, candidates) == dict(BLOCK_N=2) and len(timed) == 8
    assert tuner.choose(key, launches, candidates[2:]) == dict(BLOCK_N=3) and len(timed) == 9
    other = tmp_path / "other_kernels.py"  # a second module's kernels (int8_matmul's Gluon one): its changes count too
    other.write_text("other kernel source")
    assert _Tuner(str(source), str(other)).choose(key, launches, candidates) == dict(BLOCK_N=2) and len(timed) == 12
    other.write_text("changed other kernel source")
    assert _Tuner(str(source), str(other)).choose(key, launches, candidates) == dict(BLOCK_N=2) and len(timed) == 15


def test_token_buckets_span_a_factor_of_two():
    """The tuner times a bucket at the first token count it meets; the counts a choice then serves
    differ from that one by less than a factor of two."""
    from qtool.kernels.quant_matmul import m_bucket

    assert [m_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 64, 65, 1024, 1025)] == [1, 2, 4, 4, 8, 8, 16, 64, 128, 1024, 2048]


@pytest.mark.parametrize("weight", [uniform_weight(40, 64, 4, 32, False), lut_weight(40, 64, 16, -1, outliers=0.05)],
                         ids=["uniform", "table with outliers"])
def test_a_copy_is_the_same_weight_in_new_memory(weight):
    """The tuner times products over copies of a weight; each must compute what the weight does and
    read the bytes it reads."""
    copy = weight.copy()
    tensors = [name for name, value in vars(weight).items() if isinstance(value, torch.Tensor)]
    assert all(getattr(copy, name).data_ptr() != getattr(weight, name).data_ptr() for name in tensors)
    assert torch.equal(copy.dequantize(), weight.dequantize())
    packed_bytes = 40 * 64 // 8 * 4
    extra = (2 * 40 * 2 + 2 * 40) if weight.lut is None else (16 * 40 * 2 + weight.outlier_values.numel() * 6 + 41 * 4)
    assert copy.nbytes == weight.nbytes == packed_bytes + extra


def test_the_tuner_times_over_copies_that_fill_l2_three_times(monkeypatch):
    """As many copies as fill L2 three times over (none for a weight larger than that); on a device
    too full for them, those that fit."""
    from types import SimpleNamespace

    from qtool.kernels.quant_matmul import copies_past_l2

    weight = uniform_weight(40, 64, 4, 32, False)  # 1520 bytes
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=5000))
    copies = copies_past_l2(weight)
    assert len(copies) == 10 and copies[0] is weight and torch.equal(copies[-1].dequantize(), weight.dequantize())
    assert len(copies_past_l2(uniform_weight(40, 1024, 4, 32, False))) == 1  # 24320 bytes

    made = []

    def copy(self):
        if len(made) == 3:
            raise torch.cuda.OutOfMemoryError("full")
        made.append(self)
        return self

    monkeypatch.setattr(KernelWeight, "copy", copy)
    assert len(copies_past_l2(weight)) == 4


def test_an_outgrown_split_workspace_stays_allocated():
    """A CUDA graph captured with a split's workspace keeps writing there: a larger one replaces it
    for later launches, and the old one is kept."""
    import gc
    import weakref

    from qtool.kernels.quant_matmul import _workspace

    device = torch.device(DEVICE)
    first = _workspace(device, 1, 1)  # what earlier products left
    held, size = weakref.ref(first[0]), first[0].numel()
    larger = _workspace(device, size + 1, 1)
    del first
    gc.collect()
    assert held() is not None and larger[0].numel() >= 2 * size
    assert _workspace(device, size + 1, 1)[0] is larger[0]  # no growth while it suffices
