"""Multi-index hashing: every pair of 64-bit hashes within Hamming distance ``radius``, without all pairs.

A hash is cut into four 16-bit chunks.  If two hashes differ in at most ``radius`` bits, one
chunk differs in at most ``s = radius // 4`` bits (pigeonhole).  Two chunks differ in at
most ``s`` bits iff they are equal once some ``s`` bit positions are masked out, so every
hash gets one key per (chunk, s-subset of the 16 positions): ``4 * C(16, s)`` keys (4 for
radius <= 3, 64 for radius 4..7, 480 for radius 8..11).  Hashes sharing a key are candidates;
a candidate pair is verified with a popcount and emitted only under its *canonical* key (the
first chunk within ``s`` bits, masked by the lexicographically first s-subset covering the
differing bits), so each pair comes out exactly once, whatever partition holds that key.

Keys are ``chunk << 40 | mask << 16 | (chunk value & ~mask)``.  Pair work is the sum over key
groups of ``size^2 / 2``: for uniformly spread hashes about ``4 C(16,s) N^2 / 2^(17-s)``
(1M hashes: ~3e7 checks for radius <= 3, ~1e9 for 4..7).
"""

from __future__ import annotations

import logging
from itertools import combinations

import numpy as np

log = logging.getLogger(__name__)

CHUNKS, BITS = 4, 16
MAX_RADIUS = 11  # 480 keys per hash; larger radii would need longer keys lists


def chunk_radius(radius: int) -> int:
    return radius // CHUNKS


def masks(s: int) -> np.ndarray:
    """All s-subsets of the 16 chunk bits as uint16 masks, in lexicographic order of positions."""
    return np.array([sum(1 << p for p in c) for c in combinations(range(BITS), s)], np.uint64)


def chunk(values: np.ndarray, i: int) -> np.ndarray:
    return (values >> np.uint64(BITS * i)) & np.uint64(0xFFFF)


def keys(values: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(key, index into values) for every key of every value."""
    values = np.asarray(values, np.uint64)
    ms = masks(chunk_radius(radius))
    out_k, out_i = [], []
    idx = np.arange(len(values), dtype=np.int64)
    for i in range(CHUNKS):
        c = chunk(values, i)
        for m in ms:
            out_k.append((np.uint64(i) << np.uint64(40)) | (m << np.uint64(16)) | (c & ~m & np.uint64(0xFFFF)))
            out_i.append(idx)
    return np.concatenate(out_k).view(np.int64), np.concatenate(out_i)


def _canonical_mask(diff: np.ndarray, s: int) -> np.ndarray:
    """The first s-subset (lexicographic) containing the set bits of ``diff`` (popcount <= s)."""
    m = diff.copy()
    for _ in range(s):
        short = np.bitwise_count(m) < s
        low_zero = ~m & (m + np.uint64(1))
        m = np.where(short, m | low_zero, m)
    return m & np.uint64(0xFFFF)


def _is_canonical(x: np.ndarray, y: np.ndarray, key: np.ndarray, s: int) -> np.ndarray:
    k = key.view(np.uint64)
    ci = (k >> np.uint64(40)).astype(np.int64)
    kmask = (k >> np.uint64(16)) & np.uint64(0xFFFF)
    diff = x ^ y
    first = np.full(len(x), CHUNKS, np.int64)
    for i in range(CHUNKS - 1, -1, -1):
        first = np.where(np.bitwise_count(chunk(diff, i)) <= s, i, first)
    dchunk = (diff >> (ci.astype(np.uint64) * np.uint64(BITS))) & np.uint64(0xFFFF)
    return (first == ci) & (_canonical_mask(dchunk, s) == kmask)


def pairs(key: np.ndarray, values: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (index a, index b, distance) of values within ``radius`` among rows sharing a key.

    ``key``/``values`` are one partition's rows (from :func:`keys` of *distinct* values, so a
    key never holds one value twice); each qualifying pair is returned once, from its canonical
    key.  Work: one vectorised pass per offset inside the key groups, sum(size^2)/2 checks.
    """
    s = chunk_radius(radius)
    values = np.asarray(values, np.uint64)
    order = np.argsort(key)  # order inside a key group does not matter: pairs are a set
    k, v = key[order], values[order]
    n = len(k)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    new = np.r_[True, k[1:] != k[:-1]]
    end = np.r_[np.flatnonzero(new)[1:], n]
    remaining = end[np.cumsum(new) - 1] - np.arange(n) - 1  # rows after this one in its group
    work = int((remaining.astype(np.float64)).sum())
    if work > 5e8:
        log.warning("pHash MIH partition: %.2g candidate pairs (large key groups: many near-identical hashes)",
                    work)
    out_a, out_b, out_d = [], [], []
    idx = np.flatnonzero(remaining >= 1)
    rem = remaining[idx]
    off = 1
    while len(idx):
        x, y = v[idx], v[idx + off]
        d = np.bitwise_count(x ^ y)
        ok = d <= radius  # values under one key are distinct hashes: d > 0
        if ok.any():
            sel = idx[ok]
            canon = _is_canonical(x[ok], y[ok], k[sel], s)
            sel = sel[canon]
            out_a.append(order[sel])
            out_b.append(order[sel + off])
            out_d.append(d[ok][canon].astype(np.uint8))
        off += 1
        more = rem >= off
        idx, rem = idx[more], rem[more]
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_d)


def partition_of(key: np.ndarray, parts: int) -> np.ndarray:
    """Deterministic partition of each key (Fibonacci hashing)."""
    h = key.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((h >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)
