"""Runtime choices made when an engine is loaded (torch-free: the API process reads them too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineOptions:
    """Runtime choices made at load; the engine directory fixes everything else."""

    device: str | None = None  # None: cuda if available, else cpu
    kv_cache_memory: int | None = None  # bytes; None: a fraction of free device memory
    kv_cache_fraction: float = 0.9
    max_num_seqs: int | None = None  # None: the profile's max batch size
    max_num_tokens: int | None = None  # None: the profile's per-step token budget
    enable_prefix_caching: bool = True
    skip_verify: bool = False
    # CPU only: compute straight from the memory-mapped weight file (shared page cache, no copy)
    # instead of a private in-memory copy. Decode on the default model is ~20% slower mapped
    # (4 KiB file pages against huge anonymous pages), so the copy is the default.
    map_weights: bool = False
    # CPU only: fault in (and zero) the whole KV pool at load, so the process's memory is what it
    # will be under load from the start, instead of growing as blocks are first touched. The
    # server does this (a flat footprint; a host short of memory fails at start, not hours later);
    # the offline API does not (faster load).
    prefault_kv_cache: bool = False
    # CUDA: replay decode steps from CUDA graphs captured at load, one per batch bucket of the
    # profile (False: every step runs eagerly, launching its kernels one by one).
    cuda_graphs: bool = True
    # Launch the next decode step before reading this step's tokens, so the host's work for step
    # N+1 (scheduling, inputs, token updates) overlaps the device running step N. None: on when
    # CUDA graphs are (a GPU); on the CPU the host is the device, so there is nothing to overlap.
    overlap_steps: bool | None = None
