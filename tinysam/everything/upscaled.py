"""Full-size masks of the everything mode, computed from the 256x256 low-res logits without
upscaling them.

The reference upscales every mask's logits to the image (bilinear to 1024, crop the padding,
bilinear to H x W), then counts pixels above three thresholds (the stability score), takes the
box and run-length encodes the mask. On a 1800x1200 image that is 2.2 million logits per mask,
and dense 32x32 with every mask kept makes 3,072 of them.

Both resizes act on rows and columns separately, and each is a convex combination of two
neighbours, so every full-size logit is a convex combination of at most 3x3 neighbouring
low-res logits (``AxisMap``). The full-size pixels that share the same 3x3 window form a cell
(about 7x7 pixels on that image). If the window's minimum is above a threshold, every pixel of
the cell is; if its maximum is below, none is. Only cells that straddle a threshold, along the
masks' edges, are computed pixel by pixel, from the window and the two axes' weights. Counts,
boxes and RLE runs then follow from the cells and those few pixels.

The weights are torch's own (read off ``F.interpolate``), composed in float64; the reference
rounds after each resize, so a pixel can differ only where its logit is within about 1e-5 of a
threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..transforms import upscale_logits

# A cell is decided from its window only with this margin (float rounding of the weights).
MARGIN = 1e-4
# Masks with more unsure cells than this share are upscaled outright (noise-like logits, e.g.
# random weights: every cell straddles the threshold and the runs are as many as the pixels).
DENSE_SHARE = 0.25
# Upscale in chunks of about this many full-size logits (bounds memory on big images).
FULL_SIZE_CHUNK = 1 << 25
# Cells whose pixels are computed at once (float64 transients of about 32 MB).
EXACT_CELLS = 1 << 16


def mask_segments(masks: torch.Tensor) -> Segments:
    """The runs of B x H x W boolean masks, column by column."""
    columns = torch.nn.functional.pad(masks.transpose(1, 2).to(torch.int8), (1, 1))
    change = columns.diff(dim=2)
    k, x, y0 = (change == 1).nonzero().unbind(1)
    y1 = (change == -1).nonzero()[:, 2]
    return Segments(k.numpy(), x.numpy(), y0.numpy(), y1.numpy())


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``size_out x size_in`` weights of a bilinear resize along one axis, exactly as
    ``F.interpolate(mode="bilinear", align_corners=False)`` computes them (in float32): read
    off by resizing the identity (the other axis keeps its size, where the resize is exact)."""
    identity = torch.eye(size_in)[None, None]
    resized = torch.nn.functional.interpolate(
        identity, (size_out, size_in), mode="bilinear", align_corners=False
    )
    return resized[0, 0].double().numpy()


def _as_slice(indices: np.ndarray) -> slice | torch.Tensor:
    """A run of consecutive indices as a slice (a view, no gather); others as a tensor."""
    if len(indices) and np.array_equal(indices, np.arange(indices[0], indices[0] + len(indices))):
        return slice(int(indices[0]), int(indices[0]) + len(indices))
    return torch.from_numpy(indices)


@dataclass(frozen=True)
class AxisMap:
    """One axis of the upscaled logits: full-size index ``i`` is a combination of low-res
    indices ``first[i] .. first[i] + 2`` with ``weights[i]``. Indices sharing ``first`` are
    contiguous: block ``b`` is ``starts[b]:starts[b + 1]`` with window ``anchors[b]``."""

    first: np.ndarray  # (n,)
    weights: np.ndarray  # (n, 3) float64
    anchors: np.ndarray  # (blocks,)
    starts: np.ndarray  # (blocks + 1,)

    @property
    def size(self) -> int:
        return len(self.first)

    def block_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block, the weights of its indices padded to the longest block (blocks x longest
        x 3, float64) and which of those rows are real (blocks x longest)."""
        lengths = np.diff(self.starts)
        longest = int(lengths.max())
        offsets = np.arange(longest)
        valid = offsets[None, :] < lengths[:, None]
        index = np.minimum(self.starts[:-1, None] + offsets[None, :], self.size - 1)
        weights = np.where(valid[..., None], self.weights[index], 0.0)
        return torch.from_numpy(weights), torch.from_numpy(valid)


def axis_map(low: int, padded: int, kept: int, full: int) -> AxisMap:
    """The map of one axis: ``low`` -> ``padded`` (resize), keep the first ``kept``, -> ``full``."""
    matrix = resize_matrix(kept, full) @ resize_matrix(low, padded)[:kept]
    nonzero = matrix > 0
    first = np.argmax(nonzero, axis=1)
    last = matrix.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    if np.any(last - first > 2):  # two linear resizes in a row never reach further
        raise AssertionError("a full-size logit depends on more than 3 low-res ones")
    first = np.minimum(first, low - 3)
    weights = np.stack([matrix[np.arange(full), first + j] for j in range(3)], axis=1)
    change = np.flatnonzero(np.diff(first)) + 1
    starts = np.concatenate([[0], change, [full]])
    return AxisMap(first, weights, first[starts[:-1]], starts)


@dataclass
class Segments:
    """Runs of mask pixels, one per column and run, sorted by (mask, x, y): mask ``mask[i]``
    has pixels ``(x[i], y0[i] .. y1[i] - 1)``."""

    mask: np.ndarray
    x: np.ndarray
    y0: np.ndarray
    y1: np.ndarray

    def boxes(self, count: int) -> torch.Tensor:
        """Inclusive XYXY boxes of the ``count`` masks ([0, 0, 0, 0] for an empty one), as
        ``batched_mask_to_box`` gives them."""
        boxes = np.zeros((count, 4), dtype=np.int64)
        if len(self.mask):
            starts = np.flatnonzero(np.r_[True, self.mask[1:] != self.mask[:-1]])
            owners = self.mask[starts]
            boxes[owners, 0] = self.x[starts]
            boxes[owners, 1] = np.minimum.reduceat(self.y0, starts)
            boxes[owners, 2] = np.maximum.reduceat(self.x, starts)
            boxes[owners, 3] = np.maximum.reduceat(self.y1, starts) - 1
        return torch.from_numpy(boxes)

    def areas(self, count: int) -> np.ndarray:
        return np.bincount(self.mask, weights=self.y1 - self.y0, minlength=count).astype(np.int64)

    def rles(self, keep: np.ndarray, offset: tuple[int, int], size: tuple[int, int]) -> list[dict]:
        """Uncompressed column-major RLEs (``mask_to_rle``'s form) of the masks in ``keep``,
        placed at ``offset`` (x, y) in an image of ``size`` (H, W)."""
        h, w = size
        x0, y0 = offset
        total = h * w
        order = np.searchsorted(self.mask, keep, side="left")
        stop = np.searchsorted(self.mask, keep, side="right")
        out = []
        for first, last in zip(order.tolist(), stop.tolist()):
            col = (self.x[first:last] + x0) * h
            on = col + self.y0[first:last] + y0
            off = col + self.y1[first:last] + y0
            joined = np.flatnonzero(on[1:] == off[:-1])  # runs that continue in the next column
            if len(joined):
                on = np.delete(on, joined + 1)
                off = np.delete(off, joined)
            bounds = np.empty(2 * len(on) + 2, dtype=np.int64)
            bounds[0], bounds[-1] = 0, total
            bounds[1:-1:2], bounds[2:-1:2] = on, off
            counts = np.diff(bounds)
            if len(counts) > 1 and counts[-1] == 0:  # the mask reaches the last pixel
                counts = counts[:-1]
            out.append({"size": [h, w], "counts": counts.tolist()})
        return out


class UpscaledMasks:
    """Counts and runs of ``upscale_logits(low_res, input_size, original_size) > t`` for
    batches of low-res logits (K x 256 x 256), without the full-size logits."""

    def __init__(
        self,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        low: int = 256,
        padded: int = 1024,
    ) -> None:
        self.size = tuple(int(s) for s in original_size)
        self.input_size = tuple(int(s) for s in input_size)
        self.padded = padded
        self.rows = axis_map(low, padded, int(input_size[0]), self.size[0])
        self.cols = axis_map(low, padded, int(input_size[1]), self.size[1])
        self.row_weights, self.row_valid = self.rows.block_weights()
        self.col_weights, self.col_valid = self.cols.block_weights()
        self.row_anchor = torch.from_numpy(self.rows.anchors)
        self.col_anchor = torch.from_numpy(self.cols.anchors)
        self._row_pick = _as_slice(self.rows.anchors)
        self._col_pick = _as_slice(self.cols.anchors)
        self.cell_area = torch.outer(
            torch.from_numpy(np.diff(self.rows.starts)), torch.from_numpy(np.diff(self.cols.starts))
        ).double()

    # ------------------------------------------------------------------ cells

    def extremes(self, low_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each cell's 3x3 low-res window's minimum and maximum: K x row blocks x col blocks.
        (Elementwise over shifted views: faster here than max_pool2d.)"""
        low_res = low_res.float()
        out = []
        for reduce in (torch.minimum, torch.maximum):
            rows = reduce(reduce(low_res[:, :-2], low_res[:, 1:-1]), low_res[:, 2:])
            rows = rows[:, self._row_pick]
            cols = reduce(reduce(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])
            out.append(cols[:, :, self._col_pick])
        return out[0], out[1]

    def _exact(self, low_res: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The full-size logits of ``cells`` (n x 3: mask, row block, column block): n x
        longest row block x longest column block (padding rows and columns are 0)."""
        k, i, j = cells.unbind(1)
        windows = low_res.unfold(1, 3, 1).unfold(2, 3, 1)
        windows = windows[k, self.row_anchor[i], self.col_anchor[j]].double()  # n x 3 x 3
        rows = self.row_weights[i]  # n x R x 3
        cols = self.col_weights[j]  # n x C x 3
        return torch.bmm(torch.bmm(rows, windows), cols.transpose(1, 2))

    def _full_size(self, low_res: torch.Tensor):
        """Full-size logits the reference's way (``upscale_logits``), a few masks at a time."""
        h, w = self.size
        chunk = max(1, FULL_SIZE_CHUNK // (h * w + 1024 * 1024))
        for first in range(0, len(low_res), chunk):
            part = low_res[first : first + chunk, None]
            yield first, upscale_logits(part, self.input_size, self.size, self.padded)[:, 0]

    def _valid(self, cells: torch.Tensor) -> torch.Tensor:
        return self.row_valid[cells[:, 1], :, None] & self.col_valid[cells[:, 2], None, :]

    def analyse(self, low_res: torch.Tensor, thresholds: list[float]) -> CellLogits:
        """Decide every cell of every mask against ``thresholds``, and compute the pixels of
        the cells that straddle any of them (kept as one bit per threshold: a later
        ``count(t)`` or ``segments(t)`` takes one of these thresholds).

        Memory: at most ``DENSE_SHARE`` of a mask's pixels are computed, so a batch of K masks
        holds at most about K * H * W * DENSE_SHARE * len(thresholds) bytes
        (``masks_per_batch`` keeps that bounded)."""
        low_res = low_res.float()
        lowest, highest = self.extremes(low_res)
        top, bottom = max(thresholds), min(thresholds)
        # Straddles some threshold: not above all of them, not below all of them.
        exact = ~(lowest > top + MARGIN) & (highest >= bottom - MARGIN)
        unsure_share = torch.stack(
            [(~(lowest > t + MARGIN) & (highest >= t - MARGIN)).flatten(1) for t in thresholds]
        )
        dense = unsure_share.float().mean(2).amax(0) > DENSE_SHARE
        exact &= ~dense[:, None, None]
        cells = exact.nonzero()
        above = {t: [] for t in thresholds}
        for part in cells.split(EXACT_CELLS):
            values = self._exact(low_res, part)
            for t in thresholds:
                above[t].append(values > t)
        above = {t: torch.cat(parts) for t, parts in above.items()} if len(cells) else {}
        return CellLogits(self, low_res, lowest, dense, exact, cells, above)

    def masks_per_batch(self, thresholds: int, budget: int = 1 << 28) -> int:
        """How many masks ``analyse`` may take at once within ``budget`` bytes of pixels."""
        h, w = self.size
        return max(1, int(budget / (DENSE_SHARE * h * w * thresholds)))

    def counts(self, low_res: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
        """Pixels above each threshold, per mask: K x len(thresholds) (int64)."""
        cells = self.analyse(low_res, thresholds)
        return torch.stack([cells.count(t) for t in thresholds], dim=1)

    def segments(self, low_res: torch.Tensor, threshold: float) -> Segments:
        """The runs of ``logits > threshold`` in every column of every mask."""
        return self.analyse(low_res, [threshold]).segments(threshold)

    # ------------------------------------------------------------------ runs

    def cell_segments(
        self,
        threshold: float,
        surely: torch.Tensor,
        unsure: torch.Tensor,
        cells: torch.Tensor,
        exact: torch.Tensor,
    ) -> Segments:
        """Runs of masks decided cell by cell: ``surely`` (K x rows x cols) marks the cells
        above the threshold, ``unsure`` those whose pixels ``exact`` gives (n x R x C bool, in
        the order of ``cells``, the nonzeros of ``unsure``); every other cell is below."""
        k_masks = surely.shape[0]
        h, _ = self.size
        n_rows = len(self.rows.anchors)
        row_starts = torch.from_numpy(self.rows.starts)
        col_starts = torch.from_numpy(self.cols.starts)
        col_len = col_starts.diff()
        longest_col = self.col_weights.shape[1]
        col_offsets = torch.arange(longest_col)
        index = torch.full(unsure.shape, -1, dtype=torch.long)
        index[unsure] = torch.arange(len(cells))
        row_len = row_starts.diff()

        def column_values(k, i, j, last: bool) -> torch.Tensor:
            """Values at the first (or last) row of cells (k, i, j), per column offset."""
            value = surely[k, i, j][:, None].expand(-1, longest_col).clone()
            idx = index[k, i, j]
            amb = idx >= 0
            if amb.any():
                row = (row_len[i[amb]] - 1) if last else torch.zeros_like(i[amb])
                value[amb] = exact[idx[amb], row]
            return value

        keys = []  # (mask, x, y) of every value change inside a column, as one int64

        def emit(k, x, y) -> None:
            keys.append((k * self.size[1] + x) * (h + 1) + y)

        # 1) between two decided cells with different values: every column of the block.
        both = ~unsure[:, :-1] & ~unsure[:, 1:] & (surely[:, :-1] != surely[:, 1:])
        k, i, j = both.nonzero().unbind(1)
        x = col_starts[j][:, None] + col_offsets
        ok = col_offsets < col_len[j][:, None]
        y = row_starts[i + 1][:, None].expand_as(x)
        emit(k[:, None].expand_as(x)[ok], x[ok], y[ok])

        # 2) inside unsure cells, and at their edges (an unsure cell owns the edge above it,
        # and the edge below it when the cell below is decided).
        if len(cells):
            k, i, j = cells.unbind(1)
            x = col_starts[j][:, None] + col_offsets  # n x C
            ok_col = col_offsets < col_len[j][:, None]
            changes = exact[:, 1:] != exact[:, :-1]  # n x (R - 1) x C
            inner_ok = (torch.arange(1, exact.shape[1])[None, :] < row_len[i][:, None])[..., None]
            n, r, c = (changes & inner_ok & ok_col[:, None, :]).nonzero().unbind(1)
            emit(k[n], x[n, c], row_starts[i[n]] + 1 + r)
            has_above = i > 0
            above = column_values(k[has_above], i[has_above] - 1, j[has_above], last=True)
            differs = (above != exact[has_above, 0]) & ok_col[has_above]
            n, c = differs.nonzero().unbind(1)
            sel = has_above.nonzero()[:, 0][n]
            emit(k[sel], x[sel, c], row_starts[i[sel]])
            below_decided = i < n_rows - 1
            below_decided[below_decided.clone()] = ~unsure[
                k[below_decided], i[below_decided] + 1, j[below_decided]
            ]
            last_row = exact[below_decided, row_len[i[below_decided]] - 1]
            below = surely[k[below_decided], i[below_decided] + 1, j[below_decided]]
            differs = (last_row != below[:, None]) & ok_col[below_decided]
            n, c = differs.nonzero().unbind(1)
            sel = below_decided.nonzero()[:, 0][n]
            emit(k[sel], x[sel, c], row_starts[i[sel] + 1])

        # 3) each column's first value: a run that starts at y = 0.
        n_cols = len(self.cols.anchors)
        k = torch.arange(k_masks).repeat_interleave(n_cols)
        j = torch.arange(n_cols).repeat(k_masks)
        top = column_values(k, torch.zeros_like(k), j, last=False)
        x = col_starts[j][:, None] + col_offsets
        ok = (col_offsets < col_len[j][:, None]) & top
        emit(k[:, None].expand_as(x)[ok], x[ok], torch.zeros_like(x[ok]))

        all_keys = torch.cat(keys).sort().values.numpy() if keys else np.zeros(0, np.int64)
        column, y = np.divmod(all_keys, h + 1)
        # A column that ends inside a run gets its end at y = H.
        starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
        odd = np.flatnonzero(np.diff(np.r_[starts, len(column)]) % 2 == 1)
        ends = starts[odd] + np.diff(np.r_[starts, len(column)])[odd]
        column = np.insert(column, ends, column[ends - 1])
        y = np.insert(y, ends, h)
        mask, x = np.divmod(column[0::2], self.size[1])
        return Segments(mask, x, y[0::2], y[1::2])


@dataclass
class CellLogits:
    """A batch of masks decided cell by cell (``UpscaledMasks.analyse``): the pixels of the
    cells that straddle a threshold (``above``, for ``cells``); ``dense`` masks (noise-like)
    are upscaled outright when asked."""

    geometry: UpscaledMasks
    low_res: torch.Tensor  # K x 256 x 256
    lowest: torch.Tensor  # K x rows x cols
    dense: torch.Tensor  # K
    exact_cells: torch.Tensor  # K x rows x cols
    cells: torch.Tensor  # n x 3 (mask, row block, column block), the nonzeros of exact_cells
    above: dict[float, torch.Tensor]  # threshold -> n x R x C bool, the cells' pixels above it

    def _above(self, threshold: float) -> torch.Tensor | None:
        if not len(self.cells):
            return None
        if threshold not in self.above:
            raise ValueError(f"threshold {threshold} was not analysed ({list(self.above)})")
        return self.above[threshold]

    def count(self, threshold: float) -> torch.Tensor:
        """Pixels above ``threshold`` per mask (K, int64)."""
        geometry = self.geometry
        surely = (self.lowest > threshold + MARGIN) & ~self.exact_cells
        count = surely.flatten(1).double() @ geometry.cell_area.flatten()
        above = self._above(threshold)
        if above is not None:
            above = above & geometry._valid(self.cells)
            count.index_add_(0, self.cells[:, 0], torch.count_nonzero(above, (1, 2)).double())
        count = count.round().long()
        rows = self.dense.nonzero()[:, 0]
        for first, logits in geometry._full_size(self.low_res[rows]):
            count[rows[first : first + len(logits)]] = (logits > threshold).sum((1, 2))
        return count

    def select(self, masks: torch.Tensor) -> CellLogits:
        """The masks at indices ``masks`` (increasing), as their own batch."""
        renumber = torch.full((len(self.low_res),), -1, dtype=torch.long)
        renumber[masks] = torch.arange(len(masks))
        above, cells = self.above, self.cells
        if len(cells):
            keep = renumber[cells[:, 0]] >= 0
            above = {t: bits[keep] for t, bits in above.items()}
            cells = cells[keep].clone()
            cells[:, 0] = renumber[cells[:, 0]]
        return CellLogits(
            self.geometry,
            self.low_res[masks],
            self.lowest[masks],
            self.dense[masks],
            self.exact_cells[masks],
            cells,
            above,
        )

    def segments(self, threshold: float) -> Segments:
        """The runs of ``logits > threshold`` in every column of every mask."""
        geometry = self.geometry
        parts = []
        by_cells = (~self.dense).nonzero()[:, 0]
        if len(by_cells):
            part = self.select(by_cells) if len(by_cells) < len(self.dense) else self
            surely = (part.lowest > threshold + MARGIN) & ~part.exact_cells
            exact = part._above(threshold)
            if exact is None:
                exact = torch.zeros(0, 1, 1, dtype=torch.bool)
            segments = geometry.cell_segments(
                threshold, surely, part.exact_cells, part.cells, exact
            )
            parts.append((by_cells, segments))
        rows = self.dense.nonzero()[:, 0]
        for first, logits in geometry._full_size(self.low_res[rows]):
            parts.append((rows[first : first + len(logits)], mask_segments(logits > threshold)))
        if not parts:
            return Segments(*(np.zeros(0, np.int64) for _ in range(4)))
        if len(parts) == 1 and len(parts[0][0]) == len(self.dense):
            return parts[0][1]
        joined = [
            np.concatenate(column)
            for column in zip(
                *[(owners.numpy()[seg.mask], seg.x, seg.y0, seg.y1) for owners, seg in parts]
            )
        ]
        order = np.argsort(joined[0], kind="stable")
        return Segments(*(column[order] for column in joined))


@lru_cache(maxsize=8)
def upscaled_masks(
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    low: int = 256,
    padded: int = 1024,
) -> UpscaledMasks:
    """The (cached) ``UpscaledMasks`` of an image's sizes (and the model's: its low-res mask
    side and padded input side, 256 and 1024 for SAM's and TinySAM's)."""
    return UpscaledMasks(input_size, original_size, low, padded)
