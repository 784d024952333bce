"""Top eigenvector of A^T A from one pass over the rows of A in random order, in small memory.

Kacham & Woodruff, "Approximating the top eigenvector in random order streams", NeurIPS 2024,
arXiv 2412.11963. The paper's algorithm combines a block power method with special handling of the
few *heavy* rows (||a||^2 >= ||A||_F^2 / (d polylog d)), which would otherwise dominate a block
sample and derail the iteration. The concrete form here is the spec's reconstruction::

    z_0 = random unit vector; split the stream into B blocks of ~n/B rows (B ~ 2 ln d)
    F^ = (n / |block_1|) sum_{block_1} ||a||^2         estimate of ||A||_F^2
    a row is heavy if ||a||^2 >= F^ / (d L): heavy rows are stored exactly in H
    for each block j:
        y = (n / |block_j|) sum_{light a in block_j} (a^T z) a  +  H^T (H z)
        z_j = y / ||y||

Memory: (h + k + 2) d floats, h = number of heavy rows, k = block-1 rows not settled yet, plus the current
chunk of rows; time O(n d + B h d). In block 1 the threshold is not known yet, but its value on the rows seen
so far is a lower bound of it (it only grows): a row under that bound is light for sure and joins the block's
sum at once (which only needs z_0); only rows above it are held until the block ends. Their norms sum to at most
the block's, so k <= d L |block_1| / n ~ d L / B at any time, independent of n (before: all of block 1, n d / B).
`info["stored_floats"]` is the peak of everything held, k included.
The paper's row-norm sampling of light rows is not implemented (spec: not validated).
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch

from rankwise.core.errors import ConfigError, ShapeError
from rankwise.linalg import seeded_generator
from rankwise.solvers.result import SolverResult, Stopwatch, require_finite


def _row_chunks(rows: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 2:
            raise ShapeError(f"rows must be an (n, d) matrix or an iterable of (chunk, d) blocks, got {tuple(rows.shape)}.")
        yield from rows.split(4096)
        return
    for chunk in rows:
        chunk = torch.as_tensor(chunk)
        yield chunk[None, :] if chunk.dim() == 1 else chunk


def streaming_top_eigenvector(
    rows: torch.Tensor | Iterable[torch.Tensor],
    n_rows: int | None = None,
    *,
    blocks: int | None = None,
    polylog: float = 10.0,
    handle_heavy: bool = True,
    seed: int = 0,
    reference: torch.Tensor | None = None,
) -> SolverResult:
    """One pass over the rows (in the order given: shuffle them, the guarantee is for random order).

    Args:
        rows: an (n, d) tensor, or an iterable of (chunk, d) tensors / single rows (then `n_rows` is
            required: the block boundaries depend on n).
        blocks: B, number of power steps (default max(5, ceil(2 ln d))).
        polylog: L in the heavy threshold ||A||_F^2 / (d L).
        handle_heavy: False gives the plain block power method (the spec's ablation).
        reference: optional true top eigenvector, to record `correlation` |<z_j, v1>| per block.

    Returns a `SolverResult` with `solution` the unit vector z_B, history `correlation` (with a
    reference) and info `heavy_rows`, `stored_floats` (peak floats held: (h + k + 2) d), `peak_rows_held`, `rows_seen`.
    """
    if isinstance(rows, torch.Tensor):
        n_rows = rows.shape[0] if n_rows is None else n_rows
    if n_rows is None or n_rows < 1:
        raise ConfigError(f"n_rows={n_rows!r}: pass the number of rows in the stream (>= 1) when streaming chunks.")
    history: dict[str, list[float]] = {"correlation": []} if reference is not None else {}

    z = y = None
    heavy = candidates = None  # (h, d) stored heavy rows; (k, d) block-1 rows not yet settled
    seen = block = in_block = 0
    peak_rows_held = 0
    block_size = first_block_norms = threshold = None
    n_blocks = blocks
    with Stopwatch() as clock:
        for chunk in _row_chunks(rows):
            require_finite("rows", chunk)
            chunk = chunk.double()
            if z is None:  # first rows fix d, B and z_0
                d = chunk.shape[1]
                n_blocks = blocks if blocks is not None else max(5, math.ceil(2 * math.log(d)))
                if n_blocks < 1 or n_blocks > n_rows:
                    raise ConfigError(f"blocks={n_blocks} is invalid: expected 1 <= blocks <= n_rows={n_rows}.")
                block_size = math.ceil(n_rows / n_blocks)
                z = torch.randn(d, generator=seeded_generator(seed), dtype=torch.float64)
                z /= torch.linalg.norm(z)
                y = torch.zeros(d, dtype=torch.float64)
                heavy = torch.zeros(0, d, dtype=torch.float64)
                candidates = torch.zeros(0, d, dtype=torch.float64)
                first_block_norms = 0.0
            elif chunk.shape[1] != z.shape[0]:
                raise ShapeError(f"row width changed from {z.shape[0]} to {chunk.shape[1]} mid-stream.")
            start = 0
            while start < chunk.shape[0]:
                take = min(chunk.shape[0] - start, block_size - in_block)
                part = chunk[start:start + take]
                norms = (part * part).sum(1)
                if not handle_heavy:
                    light = part
                elif block == 0:
                    # The threshold F^/(dL) needs all of block 1. It only grows as rows arrive, so its value on
                    # the rows seen so far is a lower bound: a row under it is light for sure and joins y now
                    # (y only needs z_0). Only rows above it stay held; their norms sum to at most the block's,
                    # so at most dL|block_1|/n + h rows are held at any time, whatever n is.
                    first_block_norms += float(norms.sum())
                    lower_bound = n_rows / block_size * first_block_norms / (d * polylog)
                    settled = (candidates * candidates).sum(1) < lower_bound
                    if bool(settled.any()):
                        y += candidates[settled].T @ (candidates[settled] @ z)
                    opens = norms >= lower_bound
                    light = part[~opens]
                    # new tensor with its own storage: no view keeps a whole chunk alive
                    candidates = torch.cat([candidates[~settled], part[opens]])
                else:
                    is_heavy = norms >= threshold
                    if bool(is_heavy.any()):
                        heavy = torch.cat([heavy, part[is_heavy]])
                    light = part[~is_heavy]
                y += light.T @ (light @ z)
                peak_rows_held = max(peak_rows_held, heavy.shape[0] + candidates.shape[0])
                in_block += take
                start += take
                if in_block == block_size:
                    seen += in_block
                    heavy, candidates = _settle_first_block(block, handle_heavy, n_rows, in_block, first_block_norms, d, polylog, heavy, candidates, y, z)
                    if block == 0 and handle_heavy:
                        threshold = n_rows / block_size * first_block_norms / (d * polylog)
                    z = _power_step(y, n_rows / in_block, heavy, z)
                    if reference is not None:
                        history["correlation"].append(abs(float(z @ reference.double())) / float(torch.linalg.norm(reference.double())))
                    y.zero_()
                    in_block = 0
                    block += 1
        if z is None:
            raise ShapeError("rows is empty: the stream must contain at least one row.")
        if in_block:  # a short last block (the stream was shorter than n_rows said)
            seen += in_block
            heavy, candidates = _settle_first_block(block, handle_heavy, n_rows, in_block, first_block_norms, d, polylog, heavy, candidates, y, z)
            z = _power_step(y, n_rows / block_size, heavy, z)
            block += 1
            if reference is not None:
                history["correlation"].append(abs(float(z @ reference.double())) / float(torch.linalg.norm(reference.double())))
    # everything the state held at its largest: stored rows (heavy + unsettled block-1 rows) plus y and z
    info = {"heavy_rows": heavy.shape[0], "stored_floats": (peak_rows_held + 2) * z.shape[0],
            "peak_rows_held": peak_rows_held, "rows_seen": seen, "blocks": block}
    return SolverResult(solution=z, history=history, iterations=block, seconds=clock.seconds, info=info)


def _settle_first_block(block, handle_heavy, n_rows, rows_in_block, norms_sum, d, polylog, heavy, candidates, y, z):
    """At the end of block 1, F^ is known: held rows above the threshold become heavy, the rest join y."""
    if block != 0 or not handle_heavy:
        return heavy, candidates
    threshold = n_rows / rows_in_block * norms_sum / (d * polylog)
    is_heavy = (candidates * candidates).sum(1) >= threshold
    light = candidates[~is_heavy]
    y += light.T @ (light @ z)
    return torch.cat([heavy, candidates[is_heavy]]), candidates[:0]


def _power_step(light_sum: torch.Tensor, light_scale: float, heavy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    y = light_scale * light_sum
    if heavy.shape[0]:
        y = y + heavy.T @ (heavy @ z)
    norm = torch.linalg.norm(y)
    return y / norm if norm > 0 else z

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "streaming-eig", "paper": "2412.11963", "runs": "rankwise solve eig; rankwise.solvers.streaming_top_eigenvector",
     "summary": "top eigenvector of A^T A in one random-order pass"},
)
