"""Owns the model, the KV pool and the sampler on one device; runs one scheduled step."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from kiln.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from kiln.engine.input_batch import ChunkSpec, HostStaging, prepare_inputs
from kiln.engine.request import Request
from kiln.engine.sampler import Sampler, SamplerOutput
from kiln.engine.sampling_metadata import SamplingMetadata, plain_greedy, samples_without_history
from kiln.engine.scheduler_output import SchedulerOutput
from kiln.engine_dir import EngineManifest, load_weights
from kiln.errors import EngineLoadError
from kiln.kernels import use_kernels
from kiln.engine.events import TokenLogprobs
from kiln.model.attention import attention_context
from kiln.model.layers import rope_cos_sin
from kiln.model.llama import LlamaModel

CPU_DEFAULT_KV_BYTES = 2 << 30  # the CPU pool never takes more than this unless asked
CPU_DEFAULT_KV_FRACTION = 0.2  # ... nor more than this share of available memory


@dataclass
class RunnerOutput:
    """One entry per sampling chunk, in chunk order."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _tokens(req: Request, start: int, end: int) -> list[int]:
    p = req.num_prompt_tokens
    if end <= p:
        return req.prompt_token_ids[start:end]
    if start >= p:
        return req.output_token_ids[start - p : end - p]
    return req.prompt_token_ids[start:] + req.output_token_ids[: end - p]


def _available_host_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                prefault: bool = False) -> torch.Tensor:
    """A zero-filled KV pool. Slots never written must hold finite values: padded attention gives
    them weight 0, and 0 * NaN would still poison the output.

    On the CPU, unless `prefault`, the memory comes from calloc (through numpy), whose pages the OS
    hands out already zeroed and only when first touched: a 2 GiB pool costs nothing at load (the
    process's memory then grows by up to the pool's size as blocks are first used). With
    `prefault`, torch.zeros touches it all now (about 0.4 s for 2 GiB on the 2-core dev machine).
    """
    if device.type != "cpu" or prefault:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class ModelRunner:
    def __init__(self, manifest: EngineManifest, device: torch.device,
                 kv_cache_memory: int | None = None, kv_cache_fraction: float = 0.9,
                 map_weights: bool = False, prefault_kv_cache: bool = False, cuda_graphs: bool = True):
        t0 = time.perf_counter()
        self.manifest = manifest
        self.cfg = cfg = manifest.model
        self.profile = manifest.profile
        self.device = device
        self.dtype = manifest.dtype
        quant = manifest.quant_scheme
        fp8 = (quant is not None and quant.recipe == "fp8") or manifest.kv_cache_spec is not None
        if fp8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
            raise EngineLoadError(f"fp8 engines and fp8 KV caches need a GPU of compute capability >= 8.9 (this "
                                  f"one is {cc}); build an int8 engine with the default cache for it, or run "
                                  "on the CPU")
        weights = load_weights(manifest, device)
        if device.type == "cpu" and not map_weights:
            weights = {name: t.clone() for name, t in weights.items()}  # see EngineOptions.map_weights
        with torch.device("meta"):
            model = LlamaModel(cfg, quant)
        model.load_state_dict(weights, assign=True, strict=True)
        self.model = model.eval()
        if quant is not None and quant.act_quant == "fp8" and device.type == "cuda":
            from kiln.kernels.quant_gemm import probe_scaled_mm

            probe_scaled_mm(device, self.dtype)  # before any graph capture
        self.weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        self.rope_table = rope_cos_sin(cfg, self.profile.max_seq_len, device)
        self.block_size = self.profile.block_size
        self.kv_spec = manifest.kv_cache_spec
        self.kv_dtype = self.dtype if self.kv_spec is None else getattr(torch, self.kv_spec.dtype)
        if self.kv_spec is not None:
            for i, layer in enumerate(self.model.layers):
                layer.attn.kv_scales = self.kv_spec.layer(i)
        self.num_blocks = self._plan_num_blocks(kv_cache_memory, kv_cache_fraction)
        self.kv_caches = zeroed_pool(
            (cfg.num_layers, 2, self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim),
            self.kv_dtype, device, prefault=prefault_kv_cache,
        )
        self.sampler = Sampler()
        self.staging = HostStaging(device)
        self.capture_logits = False  # tests: keep the last collected step's sampled-row logits
        self.last_logits: torch.Tensor | None = None
        self.sync_start = self.sync_end = 0.0  # when the last step began and ended waiting for the GPU
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.graph_capture_seconds = 0.0
        if cuda_graphs and device.type == "cuda" and use_kernels(self.kv_caches) and cfg.sliding_window is None:
            args = (self.model, self.rope_table, self.kv_caches)
            width = self.profile.max_blocks_per_seq
            self.graphs = DecodeGraphs(*args, self.profile.graph_batch_sizes, width, self.block_size)
            self.prefill_graphs = PrefillGraphs(*args, self.profile.graph_prefill_tokens, width,
                                                self.block_size)
            self.graph_capture_seconds = (self.graphs.capture()
                                          + self.prefill_graphs.capture(pool=self.graphs.pool))
        self.warmup_seconds = self._warm_eager() if device.type == "cuda" and use_kernels(self.kv_caches) else 0.0
        self.load_seconds = time.perf_counter() - t0

    @property
    def block_bytes(self) -> int:
        elt = torch.empty((), dtype=self.kv_dtype).element_size()
        return self.cfg.kv_bytes_per_token(elt) * self.block_size

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def _plan_num_blocks(self, kv_cache_memory: int | None, fraction: float) -> int:
        """Blocks that fit the budget, capped at what the shape profile can ever use (+1 null block)."""
        if kv_cache_memory is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_memory = int(free * fraction)
            else:
                avail = _available_host_memory()
                kv_cache_memory = min(CPU_DEFAULT_KV_BYTES, int(avail * CPU_DEFAULT_KV_FRACTION))
        usable = self.profile.max_batch_size * self.profile.max_blocks_per_seq
        blocks = min(kv_cache_memory // self.block_bytes, usable + 1)
        if blocks < 2:
            raise EngineLoadError(
                f"KV cache budget of {kv_cache_memory} bytes holds no block "
                f"(one block of {self.block_size} tokens takes {self.block_bytes} bytes)"
            )
        return int(blocks)

    @torch.inference_mode()
    def _warm_eager(self) -> float:
        """Compile the eager path's kernel variants at load, not on a live server's first batched
        prompt (a second's stall): forward passes of a few tokens (the small-batch path), of
        several prompts (the regular path) and of a decode batch, over the null block (block 0,
        never handed out). Returns seconds."""
        t0 = time.perf_counter()
        null = [0] * -(-12 // self.block_size)
        for lens in ((3, 2), (12, 12), (1, 1)):
            specs = [ChunkSpec([0] * n, 0, null) for n in lens]
            inputs = prepare_inputs(specs, self.block_size, self.device, self.cfg.sliding_window, self.staging)
            with attention_context(inputs.attn):
                hidden = self.model(inputs.input_ids, inputs.positions, self.rope_table, self.kv_caches)
            self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _graph_step(self, out: SchedulerOutput, device_ids: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits, their argmax) from a CUDA graph replay for a pure decode step (one sampled
        token per sequence) or a step that is one sequence's prompt chunk; None when the step is
        neither or no graph fits it."""
        chunks = out.chunks
        if self.graphs is None:
            return None
        if len(chunks) == 1 and chunks[0].end - chunks[0].start > 1:
            c = chunks[0]
            if c.end - c.start > self.prefill_graphs.max_tokens:
                return None
            return self.prefill_graphs.run(_tokens(c.request, c.start, c.end), c.start, c.request.block_ids)
        if len(chunks) > self.graphs.max_batch or not out.is_decode:
            return None
        ids = [0] * len(chunks) if device_ids is not None else [
            _tokens(c.request, c.start, c.end)[0] for c in chunks]
        return self.graphs.run(ids, [c.start for c in chunks], [c.request.block_ids for c in chunks],
                               device_ids=device_ids)

    def _eager_step(self, out: SchedulerOutput, device_ids: torch.Tensor | None) -> torch.Tensor | None:
        chunks = out.chunks
        specs = [ChunkSpec([0] if device_ids is not None else _tokens(c.request, c.start, c.end),
                           c.start, c.request.block_ids, c.samples) for c in chunks]
        inputs = prepare_inputs(specs, self.block_size, self.device, self.cfg.sliding_window, self.staging)
        if device_ids is not None:
            inputs.input_ids = device_ids.to(inputs.input_ids.dtype)
        with attention_context(inputs.attn):
            hidden = self.model(inputs.input_ids, inputs.positions, self.rope_table, self.kv_caches)
        if inputs.logits_indices.numel() == 0:
            return None
        return self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))

    def _ids_after(self, out: SchedulerOutput, after: "PendingStep") -> torch.Tensor:
        """The input tokens of a step scheduled ahead: `after`'s sampled tokens (on the device) of
        the same requests, in `out`'s order."""
        where = {id(r): i for i, r in enumerate(after.reqs)}
        rows = [where[id(c.request)] for c in out.chunks]
        if rows == list(range(len(rows))):
            return after.token_ids[:len(rows)]
        index = torch.tensor(rows, dtype=torch.int64)
        if self.device.type == "cuda":
            index = index.pin_memory().to(self.device, non_blocking=True)
        return after.token_ids.index_select(0, index)

    def can_chain(self, step: "PendingStep") -> bool:
        """Whether the step after `step` may be launched before `step`'s tokens are read: `step` is
        a pure decode step whose rows draw without looking at their output so far."""
        return (step.token_ids is not None and step.out.is_decode
                and samples_without_history(step.reqs, self.cfg.vocab_size))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, after: "PendingStep | None" = None) -> "PendingStep":
        """Queue step `out` on the device, sampling included, without waiting for it. A step
        scheduled ahead takes its input tokens from `after`, the step launched before it."""
        device_ids = self._ids_after(out, after) if out.ahead else None
        graphed = self._graph_step(out, device_ids)
        greedy = None
        if graphed is not None:
            logits, greedy = graphed
        else:
            logits = self._eager_step(out, device_ids)
        reqs = [c.request for c in out.chunks if c.samples]
        step = PendingStep(out, reqs)
        if not reqs:
            return step
        if self.capture_logits:
            step.logits = logits.clone()
        ahead = int(out.ahead)
        if greedy is not None and plain_greedy(reqs, logits.shape[-1], ahead):
            step.token_ids = greedy  # computed inside the graph
        else:
            step.sampled = self.sampler(logits, SamplingMetadata.build(reqs, logits.shape[-1], self.device, ahead))
            step.token_ids = step.sampled.token_ids
        if self.device.type == "cuda":  # start the copy home now; collect() waits for it
            step.host_ids = torch.empty(len(reqs), dtype=torch.int64, pin_memory=True)
            step.host_ids.copy_(step.token_ids, non_blocking=True)
            step.ready = torch.cuda.Event()
            step.ready.record()
        else:
            step.host_ids = step.token_ids
        return step

    def collect(self, step: "PendingStep") -> RunnerOutput:
        """Wait for a launched step's sampled tokens (the step's one host synchronization)."""
        reqs = step.reqs
        if not reqs:
            return RunnerOutput([], [])
        if step.logits is not None:
            self.last_logits = step.logits
        self.sync_start = time.perf_counter()
        if step.ready is not None:
            step.ready.synchronize()
        token_ids = step.host_ids.tolist()
        self.sync_end = time.perf_counter()
        logprobs: list[TokenLogprobs | None] = [None] * len(reqs)
        sampled = step.sampled
        if any(r.params.logprobs is not None for r in reqs):
            chosen = sampled.logprobs.tolist()
            top_ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
            top_lps = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
            for i, r in enumerate(reqs):
                k = r.params.logprobs
                if k is None:
                    continue
                top = list(zip(top_ids[i][:k], top_lps[i][:k])) if k and top_ids else []
                logprobs[i] = TokenLogprobs(chosen[i], top)
        return RunnerOutput(token_ids, logprobs)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step to the end: launch, then collect."""
        return self.collect(self.launch(out))


@dataclass
class PendingStep:
    """A launched step: its sampled tokens are on the device (`token_ids`) and on their way to the
    host (`host_ids`, valid once `ready` has fired)."""

    out: SchedulerOutput
    reqs: list[Request]  # the rows that sample, in chunk order
    token_ids: torch.Tensor | None = None
    host_ids: torch.Tensor | None = None
    ready: "torch.cuda.Event | None" = None
    sampled: SamplerOutput | None = None
    logits: torch.Tensor | None = None  # a copy, when the runner's capture_logits is on (tests)
