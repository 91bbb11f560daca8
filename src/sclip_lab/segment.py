"""Images to class maps: resize, sliding windows, stitching, post-processing (docs/protocol.md §5).

Shapes: an image is ``(H, W, 3)`` uint8 RGB before normalisation, ``(3, Hr, Wr)`` float32
after resizing (``h×w`` is always a patch grid); logits are ``(Q, H, W)`` cosine
similarities (one plane per text query); probabilities ``(C, H, W)`` after the synonym
max; predictions ``(H, W)`` int64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# CLIP's normalisation constants × 255, three decimals, as in the reference pipeline.
PIXEL_MEAN = (122.771, 116.746, 104.094)
PIXEL_STD = (68.501, 66.632, 70.323)
MAX_LONG_SIDE = 2048


def resized_shape(height: int, width: int, short_side: int, max_long: int = MAX_LONG_SIDE
                  ) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the scale that fits (max_long, short_side), rounded half up.

    Returns ``(new_height, new_width)``.
    """
    scale = min(max_long / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: np.ndarray, short_side: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(h, w, 3)`` uint8, bilinear, aspect kept (small images grow)."""
    h, w = resized_shape(image.shape[0], image.shape[1], short_side)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def normalize(image: np.ndarray) -> torch.Tensor:
    """``(Hr, Wr, 3)`` uint8 RGB -> ``(3, Hr, Wr)`` float32, (x − mean) / std on 0–255 values."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (x - mean) / std


def preprocess(image: np.ndarray, short_side: int) -> torch.Tensor:
    """The whole image side of the protocol: resize then normalise -> ``(3, Hr, Wr)``."""
    return normalize(resize_image(image, short_side))


def window_boxes(height: int, width: int, crop: int, stride: int
                 ) -> list[tuple[int, int, int, int]]:
    """mmseg's slide-inference grid as ``(y1, y2, x1, x2)`` boxes, row-major.

    The last window of a row/column is shifted back inside the image; no padding; a side
    shorter than ``crop`` gives one window of its full extent.
    """
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2 = min(i * stride + crop, height)
            x2 = min(j * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def group_by_size(boxes: Sequence[tuple[int, int, int, int]]
                  ) -> dict[tuple[int, int], list[tuple[int, int, int, int]]]:
    """Boxes keyed by window size ``(hc, wc)``: equal sizes can share an encoder batch."""
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for box in boxes:
        y1, y2, x1, x2 = box
        groups.setdefault((y2 - y1, x2 - x1), []).append(box)
    return groups


def interpolation_matrix(size_in: int, size_out: int, device=None) -> torch.Tensor:
    """``(size_out, size_in)`` matrix of 1-D linear interpolation, align_corners=False.

    Bilinear resizing is separable: ``F.interpolate(L, (H, W), "bilinear") ==
    A_H @ L @ A_Wᵀ`` with these matrices (border clamping included), which lets windows be
    upsampled and stitched with two matmuls instead of a full-size add per window.
    """
    eye = torch.eye(size_in, device=device)[None]  # (1, in, in): one channel per source
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T


def stitch_windows(windows: Mapping[tuple[int, int, int, int], torch.Tensor],
                   height: int, width: int, size: tuple[int, int] | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Upsample every window's patch-grid logits to its box, average where they overlap,
    and optionally resize the result to the original image ``size``.

    Args:
        windows: box ``(y1, y2, x1, x2)`` -> ``(Q, gh, gw)`` logits on its patch grid; the
            boxes must be the full grid of ``window_boxes`` (every row range × column range).
        height, width: the stitched (resized image) size.
        size: ``(H, W)`` to bilinearly resize to (docs/protocol.md §5.7), or None.
        out: optional flat fp32 scratch of at least ``Q·H·W`` elements, reused between
            images: a fresh 200 MB tensor costs its page faults every time. The result is
            then a view of it, valid until the scratch is written again.

    Returns:
        ``(Q, H, W)`` fp32, equal to bilinear(Σ_w pad(bilinear(L_w, box)) / coverage, size)
        (docs/protocol.md §5.5–7). Every step is linear and separable and the coverage is an outer
        product of row and column counts, so it is computed as ``G_H @ M @ G_Wᵀ``: M tiles
        the low-resolution window logits, G_H / G_W stack each window row's / column's
        interpolation matrix, divided by the coverage, then the final resize matrix.
    """
    left, tiles, right = _stitch_operands(windows, height, width, size)
    if out is None:
        return left @ tiles @ right.T
    view = out[:tiles.shape[0] * left.shape[0] * right.shape[0]].view(
        tiles.shape[0], left.shape[0], right.shape[0])
    return torch.matmul(left @ tiles, right.T, out=view)  # the same product, bit for bit


def _stitch_operands(windows: Mapping, height: int, width: int, size: tuple[int, int] | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``stitch_windows``' factors ``(G_H (H, Σgh), M (Q, Σgh, Σgw), G_W (W, Σgw))``."""
    rows = sorted({(y1, y2) for y1, y2, _, _ in windows})
    cols = sorted({(x1, x2) for _, _, x1, x2 in windows})
    device = next(iter(windows.values())).device

    def placed(ranges: list[tuple[int, int]], grids: list[int], total: int) -> torch.Tensor:
        blocks = []
        for (a, b), g in zip(ranges, grids):
            block = torch.zeros(total, g, device=device)
            block[a:b] = interpolation_matrix(g, b - a, device)
            blocks.append(block)
        return torch.cat(blocks, dim=1)  # (total, Σg)

    def coverage(ranges: list[tuple[int, int]], total: int) -> torch.Tensor:
        cover = torch.zeros(total, device=device)
        for a, b in ranges:
            cover[a:b] += 1
        return cover

    grid_h = [windows[(y1, y2, *cols[0])].shape[1] for y1, y2 in rows]
    grid_w = [windows[(*rows[0], x1, x2)].shape[2] for x1, x2 in cols]
    tiles = torch.cat([torch.cat([windows[(y1, y2, x1, x2)].float() for x1, x2 in cols], dim=2)
                       for y1, y2 in rows], dim=1)  # (Q, Σgh, Σgw)
    left = placed(rows, grid_h, height) / coverage(rows, height)[:, None]  # (h, Σgh)
    right = placed(cols, grid_w, width) / coverage(cols, width)[:, None]  # (w, Σgw)
    if size is not None and tuple(size) != (height, width):
        left = interpolation_matrix(height, size[0], device) @ left
        right = interpolation_matrix(width, size[1], device) @ right
    return left, tiles, right


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(Q, h, w) -> (Q, *size)`` bilinear, align_corners=False (mmseg's resize)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


@dataclass(frozen=True)
class PostProcess:
    """Protocol constants that turn stitched logits into a class map (docs/protocol.md §5.9–12).

    Attributes:
        query_class: ``(Q,)`` long, the class index of every text query.
        num_classes: C.
        logit_scale: the dataset's scale applied before the softmax over queries.
        prob_thd: pixels whose max class probability is below it become class 0 (0 = off).
        area_thd: classes ≥ 1 covering at most this fraction of the foreground are dropped
            (None = off).
        sigmoid: ``(scale, bias)`` of the model's own sigmoid head (``text.scores=sigmoid``,
            SigLIP): each query's probability is ``sigmoid(scale·logit + bias)`` instead of
            the softmax over queries at ``logit_scale`` (None, the default).
    """

    query_class: torch.Tensor
    num_classes: int
    logit_scale: float
    prob_thd: float = 0.0
    area_thd: float | None = None
    sigmoid: tuple[float, float] | None = None


def synonym_max(values: torch.Tensor, query_class: torch.Tensor, num_classes: int,
                dim: int = 0) -> torch.Tensor:
    """Per class, the max over its queries along ``dim`` (Q -> C entries)."""
    if num_classes == values.shape[dim]:
        return values
    shape = [1] * values.dim()
    shape[dim] = -1
    index = query_class.to(values.device).view(shape).expand_as(values)
    size = list(values.shape)
    size[dim] = num_classes
    out = torch.full(size, -torch.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(dim, index, values, reduce="amax", include_self=True)


def class_probabilities(logits: torch.Tensor, pp: PostProcess) -> torch.Tensor:
    """``(Q, H, W)`` cosine logits -> ``(C, H, W)`` fp32 probabilities (max over synonyms)."""
    return synonym_max(query_probabilities(logits, pp), pp.query_class, pp.num_classes)


def query_probabilities(logits: torch.Tensor, pp: PostProcess) -> torch.Tensor:
    """``(Q, *S)`` cosine logits -> ``(Q, *S)`` fp32 per-query probabilities: the softmax
    over queries at ``pp.logit_scale``, or ``pp.sigmoid``'s own probability per query."""
    if pp.sigmoid is None:
        return torch.softmax(logits.float() * pp.logit_scale, dim=0)
    scale, bias = pp.sigmoid
    return torch.sigmoid(logits.float() * scale + bias)


# Post-processing runs over blocks of about this many logits (Q·rows·W): the temporaries
# stay in cache and no second full-size (Q, H, W) tensor is ever allocated.
CHUNK_ELEMENTS = 1 << 22
# Queries this far below a pixel's top logit (in units of the scaled logit, plus a
# relative term) can never share its probability: exp(-1e-4) is ~1e3 ulp below 1, far
# beyond the rounding of the scale, exp, sum and division (see first_max_query).
NEAR_ABS, NEAR_REL = 1e-4, 1e-5


def row_chunks(num_queries: int, height: int, width: int, budget: int | None = None
               ) -> list[slice]:
    """Row ranges of an ``(Q, H, W)`` map, each about ``budget`` (default
    ``CHUNK_ELEMENTS``) elements and at least one row."""
    step = max(1, (budget or CHUNK_ELEMENTS) // max(num_queries * width, 1))
    return [slice(r, min(r + step, height)) for r in range(0, height, step)]


# At most this many stitched logits at once (stitch_blocks; 512 MiB of fp32): every
# benchmark image (≤ 171 queries × 640×640, 19 × 1024×2048) is one block.
STITCH_ELEMENTS = 1 << 27


def stitch_blocks(windows: Mapping, height: int, width: int, size: tuple[int, int] | None = None
                  ) -> Iterator[tuple[slice, torch.Tensor]]:
    """``stitch_windows``' result as row blocks ``(rows, (Q, r, W))`` of whole ``row_chunks``:
    one (≤ ``STITCH_ELEMENTS``) is its product bit for bit; several are ``G_H[rows] @ M @ G_Wᵀ``
    (sums a BLAS may round differently), each written over the previous one."""
    left, tiles, right = _stitch_operands(windows, height, width, size)
    q, h, w = tiles.shape[0], left.shape[0], right.shape[0]
    if q * h * w <= STITCH_ELEMENTS:
        yield slice(0, h), left @ tiles @ right.T
        return
    chunks = row_chunks(q, h, w)
    per = max(1, STITCH_ELEMENTS // (q * w * (chunks[0].stop - chunks[0].start)))
    room = torch.empty(q * w * (chunks[0].stop - chunks[0].start) * per, device=left.device)
    for i in range(0, len(chunks), per):
        rows = slice(chunks[i].start, chunks[min(i + per, len(chunks)) - 1].stop)
        out = room[:q * (rows.stop - rows.start) * w].view(q, -1, w)
        yield rows, torch.matmul(left[rows] @ tiles, right.T, out=out)


def softmax_best(logits: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, *S)`` -> (max probability, first maximal query) ``(*S)`` each: the reference
    computation, softmax over queries of ``logits × scale`` in fp32."""
    return torch.softmax(logits.float() * scale, dim=0).max(0)


def first_max_query(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """``(Q, *S)`` logits -> ``(*S)`` int64: the first query of maximal softmax(scale·logits),
    without the softmax. Exactly ``softmax_best(logits, scale)[1]``.

    Why exact: a query more than ``NEAR_ABS / scale + NEAR_REL·|top|`` below a pixel's top
    logit has a scaled gap > 1e-4 after rounding, so its exp(x − max) ≤ 0.9999, and after
    the sum and the division its probability stays strictly below the top one's. Only
    pixels where another query lies within that band can tie in probability space (the
    softmax rounds near-equal logits to equal probabilities, and ties go to the lowest
    index); those few get the reference computation, the rest the top logit's index.
    The unambiguous pixels depend on no block size, thread count or BLAS.
    """
    x = logits.float()
    top, best = x.max(0)
    band = NEAR_ABS / scale + NEAR_REL * top.abs()
    count = torch.int16 if len(x) < 2**15 else torch.int32  # int16 halves the traffic
    ambiguous = (x >= top - band).sum(0, dtype=count) > 1
    if bool(ambiguous.any()):
        where = ambiguous.nonzero(as_tuple=True)
        best[where] = _padded_softmax_best(x[(slice(None), *where)], scale)
    return best


def _padded_softmax_best(columns: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax_best(columns (Q, n), scale)[1]``, with the columns padded to a multiple of
    16 per CPU thread: the softmax kernel then takes its vectorised path on every column,
    as it does on a full-size map (its scalar tail may round exp differently)."""
    n = columns.shape[1]
    lanes = 16 * torch.get_num_threads()
    pad = -n % lanes
    if pad:
        columns = torch.cat([columns, columns[:, :1].expand(-1, pad)], dim=1)
    return softmax_best(columns, scale)[1][:n]


def predict_classes(logits: torch.Tensor, pp: PostProcess) -> torch.Tensor:
    """``(Q, H, W)`` stitched logits at the original size -> ``(H, W)`` int64 class map.

    Same result as thresholding and taking the argmax of ``class_probabilities``, without
    building the ``(C, H, W)`` map: queries are ordered by class, so the class of the
    first maximal query is the lowest maximal class (ties -> lowest index), its value the
    class's probability, and zeroing a class means zeroing its queries. Runs over row
    blocks (``row_chunks``); without thresholds no probability is computed at all
    (``first_max_query``).
    """
    return classes_of_blocks(lambda: [(slice(0, logits.shape[1]), logits)],
                             tuple(logits.shape), pp, logits.device)


Blocks = Callable[[], Iterable[tuple[slice, torch.Tensor]]]  # (rows, (Q, r, W)) of row_chunks


def classes_of_blocks(blocks: Blocks, shape: tuple[int, int, int], pp: PostProcess,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """``predict_classes`` of the ``shape`` (Q, H, W) logits ``blocks()`` yields (twice: area)."""
    query_class = pp.query_class.to(device)
    if len(query_class) > 1 and bool((query_class[1:] < query_class[:-1]).any()):
        raise ValueError("text queries must be ordered by class")
    # A sigmoid head saturates (ties in fp32 where the logits differ): its reference
    # computation, the argmax of the probabilities, is taken as it is.
    if pp.prob_thd > 0 or pp.area_thd is not None or not pp.logit_scale > 0 \
            or pp.sigmoid is not None:
        return _thresholded(blocks, shape, pp, query_class)
    pred = torch.empty(shape[1:], dtype=torch.long, device=device)
    for rows, logits in _chunks(blocks()):
        pred[rows] = query_class[first_max_query(logits, pp.logit_scale)]
    return pred


def _chunks(blocks: Iterable[tuple[slice, torch.Tensor]]) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows of the map, (Q, r, W) logits)`` for every ``row_chunks`` chunk of ``blocks``."""
    for rows, logits in blocks:
        for c in row_chunks(*logits.shape):
            yield slice(rows.start + c.start, rows.start + c.stop), logits[:, c]


def _thresholded(blocks: Blocks, shape: tuple[int, int, int], pp: PostProcess,
                 query_class: torch.Tensor) -> torch.Tensor:
    """``predict_classes`` with probabilities (docs/protocol.md §5.10–12), block by block:
    the area threshold needs the whole image's argmax histogram first, then redoes only
    the blocks that hold a dropped class (elsewhere masking changes neither the first
    maximal query nor its probability)."""
    conf = torch.empty(shape[1:], device=query_class.device)
    best = torch.empty(shape[1:], dtype=torch.long, device=query_class.device)
    for rows, logits in _chunks(blocks()):
        conf[rows], best[rows] = query_probabilities(logits, pp).max(0)
    pred = query_class[best]
    if pp.area_thd is not None:
        areas = torch.bincount(pred.flatten(), minlength=pp.num_classes)
        small = areas <= pp.area_thd * areas[1:].sum()
        small[0] = False
        dropped = small[query_class].view(-1, 1, 1)
        for rows, logits in _chunks(blocks()):
            if bool(small[pred[rows]].any()):
                probs = query_probabilities(logits, pp)
                conf[rows], best[rows] = probs.masked_fill_(dropped, 0.0).max(0)
        pred = query_class[best]
    if pp.prob_thd > 0:
        pred = pred.masked_fill(conf < pp.prob_thd, 0)
    return pred
