"""Shape rules shared by the plan, the memory model and the sequence-parallel split.

Kept apart so that pidkern.plan and pidkern.memory both read them without importing each
other (docs/design.md, "The plan").
"""
from __future__ import annotations

# The pixel blocks' Linear(D -> 6*16*256) modulation runs in bands of patches of at most
# this many bytes of output at once (a whole 2048² image would take 1.5 GiB).
MODULATION_BAND_BYTES = 128 * 2**20
# The adapter heads' outputs are kept for the whole decode while they take at most this.
HEADS_KEEP_BYTES = 256 * 2**20


def modulation_band_rows(cfg, rows: int, dtype_bytes: int = 2) -> int:
    """Patches per band of the pixel blocks' modulation (the rule the Plan records)."""
    per_row = 6 * cfg.pixels_per_patch * cfg.pixel_dim * dtype_bytes
    return max(1, min(rows, MODULATION_BAND_BYTES // per_row))


def heads_fit(cfg, rows: int, dtype_bytes: int = 2) -> bool:
    """Whether all adapter heads' outputs, kept for the whole decode, take <= 256 MiB."""
    return (cfg.num_lq_heads + cfg.is_v15) * rows * cfg.hidden * dtype_bytes <= HEADS_KEEP_BYTES


def split_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """(first row, row count) of each rank's band: contiguous, as even as possible (the
    first `rows % world` ranks take one row more). Every rank must get at least one row."""
    if world < 1:
        raise ValueError(f"world={world}: expected at least one rank")
    if rows < world:
        raise ValueError(f"the image has {rows} patch rows, fewer than the {world} ranks of the group: every "
                         f"rank needs at least one row; decode a taller image or use at most {rows} processes")
    base, extra = divmod(rows, world)
    bands, start = [], 0
    for r in range(world):
        n = base + (r < extra)
        bands.append((start, n))
        start += n
    return bands
