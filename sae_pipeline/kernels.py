"""Sparse kernels of the TopK-family training step: select, gather, decode, with hand-written sparse backwards.

A selection of latents is held as a `SparseCode` in CSR form (row offsets, latent ids, values). The encoder's
pre-activations are computed densely once, outside autograd; the selected entries are then gathered by
`gather_preactivations`, whose backward touches only the selected (token, latent) pairs; `sparse_decode`
sums the selected decoder rows per token and its backward writes `W_dec.grad` only in those rows.

Cost per step with `B` tokens, `n = k * B` selected pairs (and `n_aux = k_aux * B` with AuxK), d = d_in,
m = d_sae:
- dense reference: 6 matmuls of B x d x m (encoder forward, decoder forward, and two each in their backward;
  AuxK adds a dense decode and its two backward matmuls: 9 in all);
- sparse path: 1 dense matmul of B x d x m (the encoder forward); everything else is O(n * d): an
  embedding-bag decode, a sampled dense-dense product for the value gradients and a CSR product with the
  transposed selection for each weight gradient; b_dec's encoder-side gradient is one d x m matrix-vector
  product. AuxK adds the same sparse work for n_aux pairs. Top-k over [B, m] and the optimiser's O(d * m)
  update remain dense.

On CPU the products go through PyTorch's CSR kernels (MKL); on CUDA through cuSPARSE. Every function here is
checked against the dense reference in `sae_pipeline_tests/test_kernels.py`.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# PyTorch warns once that CSR tensors are beta; the kernels below are pinned against the dense path by tests
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


class SparseCode(NamedTuple):
    """Selected latents of a batch in CSR form: token i holds latents `cols[crow[i]:crow[i + 1]]`."""

    crow: Tensor
    """Row offsets, [batch + 1], int64."""
    cols: Tensor
    """Latent ids, [nnz], int64, increasing within each row."""
    values: Tensor
    """Latent activations, [nnz]; differentiable on the training path; zero where a selected latent does not fire."""
    d_sae: int
    """Number of latents (columns)."""

    @property
    def n_rows(self) -> int:
        return self.crow.shape[0] - 1

    def rows(self) -> Tensor:
        """Token index of every entry, [nnz]."""
        return csr_rows(self.crow, self.cols.shape[0])

    def to_dense(self) -> Tensor:
        """The [batch, d_sae] latent matrix (for tests and inspection; the training step never builds it)."""
        dense = self.values.new_zeros(self.n_rows, self.d_sae)
        return dense.index_put((self.rows(), self.cols), self.values)

    def fired(self) -> Tensor:
        """[d_sae] bool: which latents are positive on at least one token of the batch (no host sync)."""
        counts = torch.zeros(self.d_sae, device=self.cols.device).index_add_(0, self.cols,
                                                                              (self.values > 0).float())
        return counts > 0

    def l0(self) -> Tensor:
        """Mean number of positive latents per token."""
        return (self.values > 0).sum().float() / self.n_rows


def csr_rows(crow: Tensor, nnz: int) -> Tensor:
    """Row index of every CSR entry, [nnz]."""
    return torch.repeat_interleave(torch.arange(crow.shape[0] - 1, device=crow.device), crow.diff(), output_size=nnz)


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row offsets [n_rows + 1] of entries with these row ids (any order), without a host sync
    (`torch.bincount` reads the maximum back on CUDA)."""
    counts = torch.zeros(n_rows, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _transpose_mm(crow: Tensor, cols: Tensor, values: Tensor, n_cols: int, dense: Tensor) -> Tensor:
    """S^T @ dense for the CSR matrix S [rows, n_cols]: [n_cols, dense.shape[1]] (a weight gradient).

    S^T is built as a CSR matrix of its own (entries sorted by column) and multiplied as CSR @ dense, the product
    MKL and cuSPARSE both have; measured faster on CPU than PyTorch's CSC transpose view."""
    order = torch.argsort(cols, stable=True)
    rows = csr_rows(crow, cols.shape[0])[order]
    return _csr(row_offsets(cols, n_cols), rows, values[order], (n_cols, crow.shape[0] - 1)) @ dense


def _transposed_weight_grad(crow: Tensor, cols: Tensor, values: Tensor, n_cols: int, dense: Tensor) -> Tensor:
    """dense^T @ S for the CSR matrix S [rows, n_cols]: [dense.shape[1], n_cols], contiguous in that layout (the
    encoder weight's). On CPU in float32 it is dense @ CSR, which MKL writes straight into that layout: measured
    56 ms against 86 ms for `_transpose_mm` plus the copy into W_enc's layout at 1024 x 768 x 24576, k32. Elsewhere
    (cuSPARSE, bf16) it is that transpose, which autograd copies when it accumulates the gradient."""
    if dense.device.type == "cpu" and dense.dtype == values.dtype == torch.float32:
        return dense.t() @ _csr(crow, cols, values, (crow.shape[0] - 1, n_cols))
    return _transpose_mm(crow, cols, values, n_cols, dense).t()


def _sampled_mm(crow: Tensor, cols: Tensor, left: Tensor, right_t: Tensor) -> Tensor:
    """(left @ right_t.T) at the CSR pattern only, as values [nnz]: a gradient of the selected entries."""
    pattern = _csr(crow, cols, left.new_zeros(cols.shape[0]), (left.shape[0], right_t.shape[0]))
    return torch.sparse.sampled_addmm(pattern, left, right_t.t(), beta=0.0).values()


def _bag(crow: Tensor, cols: Tensor, values: Tensor, rows_of: Tensor) -> Tensor:
    """sum_j values[j] * rows_of[cols[j]] per CSR row: [n_rows, rows_of.shape[1]]."""
    return F.embedding_bag(cols, rows_of, crow, mode="sum", per_sample_weights=values, include_last_offset=True)


class _GatherPreactivations(torch.autograd.Function):
    """pre[i, cols] of pre = (x - b_dec) @ W_enc + b_enc, given `pre` precomputed without autograd.

    The input x is data (no gradient); b_dec enters every token's pre-activations alike, so its gradient is
    -W_enc @ grad_b_enc, one matrix-vector product instead of a per-token gradient of x - b_dec."""

    @staticmethod
    def forward(ctx, x_c: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, crow: Tensor,
                cols: Tensor) -> Tensor:
        ctx.save_for_backward(x_c, W_enc, crow, cols)
        return pre[csr_rows(crow, cols.shape[0]), cols].to(W_enc.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_c, W_enc, crow, cols = ctx.saved_tensors
        grad = grad.contiguous()
        grad_w = grad_b_dec = grad_b_enc = None
        if ctx.needs_input_grad[2]:
            grad_w = _transposed_weight_grad(crow, cols, grad, W_enc.shape[1], x_c.to(grad.dtype))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_b_enc = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
            grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[1] else None
        return None, grad_b_dec, grad_w, grad_b_enc, None, None, None


class _SparseDecode(torch.autograd.Function):
    """x_hat[i] = sum over the row's entries of values * W_dec[cols]; gradients only at the selected entries."""

    @staticmethod
    def forward(ctx, crow: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(crow, cols, values, W_dec)
        return _bag(crow, cols, values, W_dec)

    @staticmethod
    def backward(ctx, grad: Tensor):
        crow, cols, values, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[2]:
            grad_values = _sampled_mm(crow, cols, grad, W_dec)
        if ctx.needs_input_grad[3]:
            grad_w = _transpose_mm(crow, cols, values.detach(), W_dec.shape[0], grad)
        return None, None, grad_values, grad_w


def gather_preactivations(x_c: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, crow: Tensor,
                          cols: Tensor) -> Tensor:
    """The selected entries of `pre` (= x_c @ W_enc + b_enc with x_c = x - b_dec, computed under no_grad),
    differentiable w.r.t. b_dec, W_enc and b_enc with a backward that costs O(nnz * d_in)."""
    return _GatherPreactivations.apply(x_c.detach(), b_dec, W_enc, b_enc, pre.detach(), crow, cols)


def sparse_decode(code: SparseCode, W_dec: Tensor) -> Tensor:
    """code @ W_dec without a dense [batch, d_sae] matrix: [batch, d_in] (add b_dec yourself)."""
    return _SparseDecode.apply(code.crow, code.cols, code.values.to(W_dec.dtype), W_dec)


def topk_selection(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(crow, cols) of the k largest scores per row, latent ids increasing within a row."""
    cols = scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    crow = torch.arange(0, scores.shape[0] * k + 1, k, device=scores.device)
    return crow, cols.flatten()


def batch_topk_selection(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(crow, cols) of the k * batch largest scores of the whole batch (per-token counts vary)."""
    n_rows, n_cols = scores.shape
    flat = scores.flatten().topk(min(k * n_rows, scores.numel()), sorted=False).indices.sort().values
    return row_offsets(flat // n_cols, n_rows), flat % n_cols
