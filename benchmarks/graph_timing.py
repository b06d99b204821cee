"""The GPU time of one short call, as the benchmarks of single kernels take it: the median replay
of a CUDA graph of many calls (triton.testing.do_bench) over their number. A graph of one launch
would count the graph's own start, and Python's launch overhead outlasts such calls."""

import torch
import triton


def graph_us(calls: list, rep: int = 50, warmup: int = 5) -> float:
    """Microseconds of one of `calls` (functions of no arguments), replayed together as one graph."""
    for call in calls:  # compiles, tunes and allocates outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") / len(calls) * 1e3
