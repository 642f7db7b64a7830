"""From a parsed completion body to a checked `Job`: sampling params, prompts, limits.

Split in two by cost: `checked_request` runs before admission and never tokenizes (so an
overloaded server refuses in microseconds); `prepare_job` tokenizes (off the event loop when the
text is long) and checks each prompt against the vocabulary, the context and the KV pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from kiln.errors import RequestError
from kiln.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from kiln.serve.api_models import ChatCompletionRequest, CompletionRequest
from kiln.serve.state import ServerState

IN_THREAD_BYTES = 16 << 10  # text work on longer inputs runs in a thread, off the event loop
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: the rest of the context


@dataclass
class Checked:
    """What is known before tokenizing."""

    chat: bool
    params: SamplingParams  # max_tokens is a placeholder until prepare_job
    max_tokens_field: str  # "max_tokens" or "max_completion_tokens"
    raw_prompts: list  # completions: strings and/or token-id lists; chat: [None]
    seqs: int  # n x prompts: the running slots it takes
    min_prompt_tokens: int  # a lower bound of all its prompt tokens, from bytes and id counts
    text_bytes: int


@dataclass
class Job:
    """A checked, tokenized request: its prompts, per-prompt params, and how to answer."""

    chat: bool
    prompts: list[list[int]]
    params: list[SamplingParams]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo_texts: list[str]

    @property
    def n(self) -> int:
        return self.params[0].n

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def _or(v, default):
    return default if v is None else v


def _unsupported(body: ChatCompletionRequest | CompletionRequest, chat: bool) -> None:
    """Fields kiln does not implement are refused, never silently ignored."""
    if body.logit_bias:
        raise RequestError("logit_bias is not supported", param="logit_bias")
    if chat:
        if body.tools or body.functions:
            raise RequestError("tools and function calling are not supported", param="tools")
        if body.tool_choice not in (None, "none") or body.function_call not in (None, "none"):
            raise RequestError("tool_choice is not supported", param="tool_choice")
        fmt = (body.response_format or {}).get("type", "text")
        if fmt != "text":
            raise RequestError(f"response_format {fmt!r} is not supported (only 'text')",
                               param="response_format")
    else:
        if body.echo and body.logprobs is not None:
            raise RequestError("echo with logprobs is not supported (no prompt logprobs)", param="echo")
        if body.suffix:
            raise RequestError("suffix is not supported", param="suffix")


def _sampling(body: ChatCompletionRequest | CompletionRequest, chat: bool) -> tuple[SamplingParams, str]:
    mt_name, mt = "max_tokens", body.max_tokens
    if chat:
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, "
                               f"got {body.top_logprobs}", param="top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.max_completion_tokens is not None:
            mt_name, mt = "max_completion_tokens", body.max_completion_tokens
    else:
        logprobs = body.logprobs
    if mt is not None and mt < 1:
        raise RequestError(f"{mt_name} must be at least 1, got {mt}", param=mt_name)
    stop = _or(body.stop, ())
    params = SamplingParams(
        max_tokens=_or(mt, 1), temperature=_or(body.temperature, 1.0), top_p=_or(body.top_p, 1.0),
        top_k=_or(body.top_k, -1), min_p=_or(body.min_p, 0.0),
        repetition_penalty=_or(body.repetition_penalty, 1.0),
        presence_penalty=_or(body.presence_penalty, 0.0), frequency_penalty=_or(body.frequency_penalty, 0.0),
        seed=body.seed, n=_or(body.n, 1), stop=(stop,) if isinstance(stop, str) else tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()), min_tokens=0, ignore_eos=_or(body.ignore_eos, False),
        logprobs=logprobs, skip_special_tokens=_or(body.skip_special_tokens, True),
        priority=_or(body.priority, 0))
    return params, mt_name


def _completion_prompts(body: CompletionRequest) -> list:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise RequestError("prompt is empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)  # a batch: strings or token-id lists


def _chat_texts(body: ChatCompletionRequest) -> list[str]:
    out = []
    for m in body.messages:
        c = m.content
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out += [p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out


def checked_request(state: ServerState, body: ChatCompletionRequest | CompletionRequest,
                    chat: bool) -> Checked:
    """Every check that needs no tokenization (RequestError on the first failure)."""
    _unsupported(body, chat)
    params, mt_name = _sampling(body, chat)
    bad = next((t for t in params.stop_token_ids if t >= state.vocab_size), None)
    if bad is not None:
        raise RequestError(f"stop token id {bad} is outside the vocabulary [0, {state.vocab_size})",
                           param="stop_token_ids")
    if chat:
        if not body.messages:
            raise RequestError("messages must not be empty", param="messages")
        raw, texts, ids_count, param = [None], _chat_texts(body), 0, "messages"
    else:
        raw = _completion_prompts(body)
        texts = [p for p in raw if isinstance(p, str)]
        ids_count, param = sum(len(p) for p in raw if isinstance(p, list)), "prompt"
    seqs = params.n * len(raw)
    limit = state.admission.max_running_seqs
    if seqs > limit:
        raise RequestError(f"n x prompts = {seqs} sequences, more than this server runs at once ({limit})",
                           param="n")
    sizes = [len(t.encode("utf-8")) for t in texts]  # each text encoded once: prompts can be MBs
    nbytes = sum(sizes)
    lower = nbytes // state.tokenizer.max_token_bytes
    longest = max(sizes, default=0) // state.tokenizer.max_token_bytes
    if longest >= state.max_seq_len:  # certain without tokenizing: refuse before the expensive part
        raise RequestError(f"the {param} has at least {longest} tokens; the model's context is "
                           f"{state.max_seq_len} tokens", param=param)
    return Checked(chat, params, mt_name, raw, seqs, lower + ids_count, nbytes)


async def off_loop(nbytes: int, fn, *args):
    """Run text work in a thread when the input is long, so the event loop keeps answering."""
    if nbytes > IN_THREAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _fit(state: ServerState, ids: list[int], c: Checked, body, prompt_param: str,
         default_max: int | None) -> SamplingParams:
    """The prompt's final params: max_tokens defaulted, or checked against the context and KV pool."""
    ctx, vocab, mt_name = state.max_seq_len, state.vocab_size, c.max_tokens_field
    if not ids:
        raise RequestError(f"{prompt_param} is empty", param=prompt_param)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param=prompt_param)
    if len(ids) >= ctx:
        raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {ctx} tokens, "
                           f"leaving no room to generate", param=prompt_param)
    asked = body.max_completion_tokens if mt_name == "max_completion_tokens" else body.max_tokens
    if asked is None:
        max_tokens = ctx - len(ids) if default_max is None else min(default_max, ctx - len(ids))
    elif len(ids) + asked > ctx:
        raise RequestError(f"the prompt has {len(ids)} tokens and {mt_name} is {asked}: together "
                           f"{len(ids) + asked}, more than the model's context of {ctx} tokens",
                           param=mt_name)
    else:
        max_tokens = asked
    ready = state.client.ready
    room = ready.total_blocks * ready.block_size  # one sequence alone can use the whole KV pool
    if len(ids) + max_tokens > room:
        if asked is not None:
            raise RequestError(f"the prompt has {len(ids)} tokens and {mt_name} is {asked}: together "
                               f"{len(ids) + asked}, more than the KV cache holds ({room} tokens)",
                               param=mt_name)
        if len(ids) >= room:
            raise RequestError(f"the prompt has {len(ids)} tokens, more than the KV cache holds "
                               f"({room} tokens)", param=prompt_param)
        max_tokens = room - len(ids)
    min_tokens = _or(body.min_tokens, 0)
    if not 0 <= min_tokens <= max_tokens:
        raise RequestError(f"min_tokens must be in [0, {mt_name}={max_tokens}], got {min_tokens}",
                           param="min_tokens")
    return dataclasses.replace(c.params, max_tokens=max_tokens, min_tokens=min_tokens)


async def prepare_job(state: ServerState, body, c: Checked) -> Job:
    """Tokenize (off the loop when long) and check every prompt."""
    tok = state.tokenizer
    echo_texts: list[str] = []
    if c.chat:
        messages = [m.model_dump() for m in body.messages]
        add_gen = _or(body.add_generation_prompt, True)
        ids_list = [await off_loop(c.text_bytes + 64 * len(messages), tok.encode_chat, messages, add_gen)]
        prompt_param, default_max = "messages", None
    else:
        ids_list = []
        for p in c.raw_prompts:
            if isinstance(p, str) and p:
                ids_list.append(await off_loop(len(p), tok.encode, p))
            elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                ids_list.append(list(p))
            else:
                raise RequestError("prompt must be a string, a list of strings, a list of token ids, "
                                   "or a list of token-id lists, none of them empty", param="prompt")
            if body.echo:
                echo_texts.append(p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False))
        prompt_param, default_max = "prompt", COMPLETIONS_DEFAULT_MAX_TOKENS
    per_prompt = [_fit(state, ids, c, body, prompt_param, default_max) for ids in ids_list]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if c.chat:
        logprobs, top = bool(body.logprobs), body.top_logprobs or 0
    else:
        logprobs, top = body.logprobs is not None, body.logprobs or 0
    return Job(c.chat, ids_list, per_prompt, bool(body.stream), include_usage, logprobs, top, echo_texts)
