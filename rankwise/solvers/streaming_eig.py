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

Memory: (h + 2) d floats (h = number of heavy rows) plus the current chunk of rows; time O(n d + B h d).
In block 1 the threshold is not known yet: rows above a running estimate are held as candidates
and settled when the block ends (light ones then join that block's sum, which only needs z_0).
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
    reference) and info `heavy_rows`, `stored_floats` (the O((h+2) d) state), `rows_seen`.
    """
    if isinstance(rows, torch.Tensor):
        n_rows = rows.shape[0] if n_rows is None else n_rows
    if n_rows is None or n_rows < 1:
        raise ConfigError(f"n_rows={n_rows!r}: pass the number of rows in the stream (>= 1) when streaming chunks.")
    history: dict[str, list[float]] = {"correlation": []} if reference is not None else {}

    z = y = None
    heavy: list[torch.Tensor] = []
    candidates: list[torch.Tensor] = []
    seen = block = in_block = 0
    block_size = first_block_norms = light_seen_norms = threshold = None
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
                first_block_norms = light_seen_norms = 0.0
            elif chunk.shape[1] != z.shape[0]:
                raise ShapeError(f"row width changed from {z.shape[0]} to {chunk.shape[1]} mid-stream.")
            start = 0
            while start < chunk.shape[0]:
                take = min(chunk.shape[0] - start, block_size - in_block)
                part = chunk[start:start + take]
                norms = (part * part).sum(1)
                if not handle_heavy:
                    is_heavy = torch.zeros_like(norms, dtype=torch.bool)
                elif block == 0:
                    first_block_norms += float(norms.sum())
                    # running estimate from light rows seen so far; nothing seen yet -> hold as candidate
                    estimate = n_rows / max(seen + in_block, 1) * max(light_seen_norms, 0.0)
                    is_heavy = norms >= estimate / (d * polylog)
                    light_seen_norms += float(norms[~is_heavy].sum())
                    candidates.extend(part[is_heavy])
                else:
                    is_heavy = norms >= threshold
                    heavy.extend(part[is_heavy])
                light = part[~is_heavy]
                y += light.T @ (light @ z)
                in_block += take
                start += take
                if in_block == block_size:
                    seen += in_block
                    if block == 0 and handle_heavy:
                        threshold = n_rows / block_size * first_block_norms / (d * polylog)
                        for row in candidates:  # settle block 1's candidates now that F^ is known
                            if float(row @ row) >= threshold:
                                heavy.append(row)
                            else:
                                y += row * float(row @ z)
                        candidates = []
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
            z = _power_step(y, n_rows / block_size, heavy, z)
            block += 1
            if reference is not None:
                history["correlation"].append(abs(float(z @ reference.double())) / float(torch.linalg.norm(reference.double())))
    info = {"heavy_rows": len(heavy), "stored_floats": (len(heavy) + 2) * z.shape[0], "rows_seen": seen, "blocks": block}
    return SolverResult(solution=z, history=history, iterations=block, seconds=clock.seconds, info=info)


def _power_step(light_sum: torch.Tensor, light_scale: float, heavy: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    y = light_scale * light_sum
    if heavy:
        H = torch.stack(heavy)
        y = y + H.T @ (H @ z)
    norm = torch.linalg.norm(y)
    return y / norm if norm > 0 else z

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "streaming-eig", "paper": "2412.11963", "runs": "rankwise solve eig; rankwise.solvers.streaming_top_eigenvector",
     "summary": "top eigenvector of A^T A in one random-order pass"},
)
