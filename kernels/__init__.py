"""Triton kernels, each beside a plain-torch reference and a dispatcher (`dispatch.triton_runs`
says where the kernels run)."""
